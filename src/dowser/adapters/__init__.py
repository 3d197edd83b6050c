"""Adapters for other tools' file formats: dowser deltas as PEFT (SHiRA) adapters and back.

    from dowser.adapters.peft import export_peft, import_peft

See `dowser.adapters.peft` for the format and what round-trips bit for bit.
"""
