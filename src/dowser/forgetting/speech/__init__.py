"""The forgetting benchmark on a real pretrained speech model: Whisper tiny.en.

Modules, in the order the track uses them:
    synth.py    espeak-ng speech in several accents, voices and rates, at 16 kHz
"""
