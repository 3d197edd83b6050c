"""Model importers: checkpoints in other formats turned into Hugging Face checkpoint folders.

from dowser.importers import import_ct2
import_ct2("path/with/model.bin", "whisper-tiny-en")   # CTranslate2 Whisper -> HF folder
"""

from dowser.importers.ct2 import CT2Model, read_ct2
from dowser.importers.whisper import import_ct2, installed_whisper_tiny_en

__all__ = ["CT2Model", "import_ct2", "installed_whisper_tiny_en", "read_ct2"]
