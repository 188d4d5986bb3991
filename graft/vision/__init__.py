"""Vision (chapters 3 and 9): reading images, the checkpoint's preprocessing, training augmentation.

from graft.vision import ImageProcessor

processor = ImageProcessor.for_model("vit-folder", model.config)
pixels = processor(["cat.png", record["image"]])   # (B, 3, 224, 224)
"""

from graft.vision.images import open_image, to_mode
from graft.vision.preprocess import AUGMENTS, PREPROCESSOR_FILE, ImageProcessor

__all__ = ["AUGMENTS", "PREPROCESSOR_FILE", "ImageProcessor", "open_image", "to_mode"]
