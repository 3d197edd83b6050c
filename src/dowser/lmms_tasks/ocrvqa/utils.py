"""Hooks of the OCR-VQA task for lmms-eval (named from ocrvqa.yaml with !function).

Runs inside lmms-eval, not dowser: it imports nothing from dowser. A row of howard-hou/OCR-VQA
is one book cover with parallel lists `questions` and `answers`; rows that already hold one
`question` and `answer` are kept as they are. The score of an answer is exact match after
lower-casing and dropping punctuation and surrounding blanks (OCR-VQA has one answer per
question), so the task's exact_match is the fraction of questions answered right, in [0, 1].
"""

import string

_DROP = str.maketrans("", "", string.punctuation)


def _normalise(text) -> str:
    return " ".join(str(text).lower().translate(_DROP).split())


def ocrvqa_process_docs(dataset):
    """One document per (question, answer) pair; other columns (the image) are repeated."""
    if "questions" not in dataset.column_names:
        return dataset

    def explode(batch):
        keys = [k for k in batch if k not in ("questions", "answers")]
        out = {k: [] for k in keys}
        out.update(question=[], answer=[], question_index=[])
        for row in range(len(batch["questions"])):
            pairs = zip(batch["questions"][row], batch["answers"][row], strict=False)
            for index, (question, answer) in enumerate(pairs):
                for k in keys:
                    out[k].append(batch[k][row])
                out["question"].append(question)
                out["answer"].append(answer)
                out["question_index"].append(index)
        return out

    return dataset.map(explode, batched=True, remove_columns=dataset.column_names)


def ocrvqa_doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def ocrvqa_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def ocrvqa_process_results(doc, results):
    """exact_match: 1.0 when the first generated answer matches the reference, else 0.0."""
    return {"exact_match": float(_normalise(results[0]) == _normalise(doc["answer"]))}
