"""Post-hoc merging baselines, one file per method: fine-tune normally, then pull most of the weights back to W_pre.

All three work on named weight tensors (a `state_dict`, or any name -> tensor mapping), so they
apply to any torch model, Hugging Face or not:

    dare          delta' = m * delta / (1 - p),  m_ij ~ Bernoulli(1 - p)    (random drop + rescale)
    graft         keep the largest |delta| fine-tuned, revert the rest      (magnitude grafting)
    model_tailor  keep the entries with the best salience/sensitivity fusion score, revert the
                  rest, and let the kept ones compensate (OBS) for the reverted ones, using the
                  input covariance H = 2 X X^T / n of each linear layer on task data

with delta = W_ft - W_pre. Each returns {name: merged tensor} for the names it covers; load
it over the fine-tuned (or base) model:

    base = {n: t.clone() for n, t in base_model.state_dict().items()}
    tuned = tuned_model.state_dict()
    tuned_model.load_state_dict(dare(base, tuned, drop=0.9), strict=False)

Model Tailor first needs H for each linear layer, from forward passes on task data through
the fine-tuned model (its layer outputs W_ft X are what the compensation tries to keep):

    with InputCovariance(tuned_model) as cov:          # every nn.Linear unless names are given
        for batch in task_batches:
            cov.attention_mask = batch.get("attention_mask")  # padding does not count
            tuned_model(**batch)
    merged = model_tailor(base, tuned, cov.hessians(), keep=0.1)

H takes d_in^2 float32 per distinct layer input (q/k/v share one, gate/up share one): for a
7B decoder (d = 4096, d_ff = 11008) about 0.13 GB for attention and 0.55 GB for the MLP per
decoder layer, some 22 GB for 32 layers. There, collect the Hessians a few layers at a time
and merge those layers before collecting the next (each round runs the task batches again):

    projections = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                   "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    num_layers = tuned_model.config.num_hidden_layers
    merged = {}
    for first in range(0, num_layers, 4):                  # 4 layers: about 2.7 GB of H
        modules = [f"model.layers.{i}.{p}" for i in range(first, min(first + 4, num_layers))
                   for p in projections]
        with InputCovariance(tuned_model, modules) as cov:
            for batch in task_batches:
                cov.attention_mask = batch.get("attention_mask")
                tuned_model(**batch)
        merged.update(model_tailor(base, tuned, cov.hessians(), keep=0.1,
                                   names=[f"{m}.weight" for m in modules]))
        del cov                                            # frees these layers' sums
    tuned_model.load_state_dict(merged, strict=False)      # last: H is of the fine-tuned model

Which names are processed (all three): by default every name present in both mappings whose
tensors differ. Element-wise methods (dare, graft) apply to any tensor shape, but by default a
differing tensor with fewer than 2 dimensions (norm weights, biases) is returned fine-tuned,
untouched; name it in `names` to have it dropped/grafted too. Model Tailor processes only 2-D
weights (d_out x d_in, the nn.Linear layout) that have a Hessian; every other selected tensor
is returned fine-tuned. Non-floating tensors (integer buffers) are always returned fine-tuned.

Tied weights: names whose fine-tuned tensors are one tensor (same storage, offset, shape and
strides, e.g. `model.embed_tokens.weight` and `lm_head.weight` of a tied model) are merged once,
and every such name gets the same merged tensor, so loading the result cannot leave the tie
holding whichever name was loaded last. Their base tensors must be equal. DARE draws that
tensor's mask under the first of the names in sorted order; Model Tailor uses the sum of the
Hessians given under the names (a weight read by two layers answers for both outputs), and
reverts none of it when none of them has one. Base tensors are converted to the fine-tuned
tensor's dtype and device one at a time, as each is merged.

Outputs have the fine-tuned tensor's dtype and device; a tensor returned untouched is the
fine-tuned tensor itself (not a copy). Counts of kept entries are exactly round(keep * numel)
per tensor (halves round up, as in `dowser.mask`), ties broken by the lower flat index.
"""

from dowser.baselines.merging.covariance import InputCovariance
from dowser.baselines.merging.dare import dare
from dowser.baselines.merging.grafting import graft
from dowser.baselines.merging.model_tailor import model_tailor

__all__ = ["InputCovariance", "dare", "graft", "model_tailor"]
