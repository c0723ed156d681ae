"""Everything about images before they reach a model.

- `images`: `load_image`, the one way an image file is read (bit depth, EXIF, alpha, size);
- `datasets`: ImageFolder or flat folders, the bundled digits, in-memory labelled tensors;
- `cluttered`, `bundled`: the cluttered digits, and the data sets shipped in code by name;
- `transforms`: DINO multi-crop (lightly per image, or batched on tensors), the eval transform;
- `crops`: RandomResizedCrop's boxes for many crops at once; the workers' half of `fast`;
- `color`, `photometric`: DINO's colour augmentation, drawn per view, applied to whole batches;
- `streams`: resumable training streams of views, seeded by (seed, epoch, batch) only;
- `training`: the training stream a config's `data` section describes;
- `splits`: labelled train/val splits for k-NN and linear evaluation;
- `batches`: evaluation passes over a split, unreadable images left out or stopping the pass.
"""

from ssl_kd.data.batches import ImageBatches, UnreadableImages, image_batches
from ssl_kd.data.bundled import BUNDLED, bundled_splits, is_bundled
from ssl_kd.data.cluttered import cluttered_digits, cluttered_digits_layout
from ssl_kd.data.datasets import (
    DIGITS_IMAGES,
    IMAGE_EXTENSIONS,
    FlatImageFolder,
    LabelledImageFolder,
    TensorImages,
    digits,
    digits_train_size,
    find_images,
    has_class_folders,
    image_dataset,
    is_image_folder,
)
from ssl_kd.data.images import ALPHA_BACKGROUND, DataError, load_image
from ssl_kd.data.splits import (
    EvalSplits,
    LabelledFolders,
    ValSplit,
    eval_splits,
    knn_splits,
    open_eval_folders,
    val_split,
)
from ssl_kd.data.streams import (
    EpochPermutation,
    LoaderStream,
    SeededSamples,
    TensorMultiCropStream,
    Views,
    batches_per_epoch,
)
from ssl_kd.data.training import build_train_stream, check_batch, labelled_classes
from ssl_kd.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BatchedMultiCrop,
    MultiCropSpec,
    eval_transform,
    lightly_multi_crop,
    lightly_single_crop,
    normalize_images,
    to_unit_range,
)

__all__ = [
    "ALPHA_BACKGROUND",
    "BUNDLED",
    "DIGITS_IMAGES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "BatchedMultiCrop",
    "DataError",
    "EpochPermutation",
    "EvalSplits",
    "FlatImageFolder",
    "ImageBatches",
    "LabelledFolders",
    "LabelledImageFolder",
    "LoaderStream",
    "MultiCropSpec",
    "SeededSamples",
    "TensorImages",
    "TensorMultiCropStream",
    "UnreadableImages",
    "ValSplit",
    "Views",
    "batches_per_epoch",
    "build_train_stream",
    "bundled_splits",
    "check_batch",
    "cluttered_digits",
    "cluttered_digits_layout",
    "digits",
    "digits_train_size",
    "eval_splits",
    "eval_transform",
    "find_images",
    "has_class_folders",
    "image_batches",
    "image_dataset",
    "is_bundled",
    "is_image_folder",
    "knn_splits",
    "labelled_classes",
    "lightly_multi_crop",
    "lightly_single_crop",
    "load_image",
    "normalize_images",
    "open_eval_folders",
    "to_unit_range",
    "val_split",
]
