"""Data sets for image classification, loaded from local files only, and device-side minibatches.

:func:`load` returns a :class:`Dataset`: images ``(N, H, W, C)`` float32 (NHWC), labels ``(N,)`` int32,
a training and a test split. Images are scaled to ``[0, 1]`` and, by default, standardized per channel
with the training set's statistics (:func:`standardize`). Nothing is downloaded and nothing is unpickled.

Formats (:data:`DATASETS`):

* ``digits`` -- scikit-learn's 8x8 handwritten digits (shipped with the package): 1,797 images
  ``(8, 8, 1)``, values 0..16 divided by 16; a fixed stratified split of 1,437 training and 360 test images.
* ``mnist``, ``fashion_mnist`` -- four IDX files in ``data_dir``: ``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, raw or ``.gz``
  (``train-images.idx3-ubyte`` style names too). An IDX file is two zero bytes, the element type (``0x08``,
  unsigned byte), the number of dimensions, one big-endian uint32 per dimension, then the bytes, row-major:
  images ``(N, H, W)``, labels ``(N,)`` in 0..9.
* ``cifar10`` -- the *binary* version: ``data_batch_1.bin`` .. ``data_batch_5.bin`` (whichever exist) and
  ``test_batch.bin``, in ``data_dir`` or ``data_dir/cifar-10-batches-bin``. Each record is 3,073 bytes: the
  label (0..9), then the red, green and blue 32x32 planes, row-major; images become ``(N, 32, 32, 3)``.
* ``npz`` -- an ``.npz`` archive ``data_path`` with ``x_train``, ``y_train``, ``x_test``, ``y_test`` and
  optionally a scalar ``num_classes``; images ``(N, H, W)`` or ``(N, H, W, C)``, uint8 (divided by 255) or
  floating (kept); labels ``(N,)`` or ``(N, 1)``, integer or integral float. Read with
  ``allow_pickle=False``.
* ``synthetic`` -- learnable random images (a random prototype per class plus noise), deterministic from
  ``seed``, for benchmarks and smoke tests.

Image folders of any size (``ROOT/train/<class>/*``, ``ROOT/val/<class>/*``, JPEG, PNG and whatever Pillow
reads) are not loaded into memory: :func:`image_folder` indexes them (:mod:`jaxcnn.data.folder`) and
:class:`Batches` streams them through Grain as uint8 batches (:mod:`jaxcnn.data.stream`), decoded and augmented
by :mod:`jaxcnn.data.images`; ``jaxcnn.train.fit(config, data=image_folder(...))`` trains on one.

Every problem with the input -- a missing file or directory, a malformed file, NaN or Inf images, labels
out of range, mismatched counts or shapes, an empty split -- raises :class:`DataError` (a ``ValueError``)
with a one-line message naming the problem and the file or directory.

:func:`batches` iterates over an epoch in minibatches placed on a device, in the order of
:func:`epoch_order` (a permutation from a PRNG key), the last partial batch included (:func:`num_batches`).
"""

from jaxcnn.data._batching import ahead, batches, epoch_order, num_batches
from jaxcnn.data._dataset import DataError, Dataset, channel_stats, check_labels, standardize, standardize_with
from jaxcnn.data._loaders import DATASETS, load
from jaxcnn.data.augment import augment
from jaxcnn.data.folder import BadFilesError, FolderIndex, ImageFolder, image_folder
from jaxcnn.data.stream import Batches, StreamSpec

__all__ = [
    "DATASETS",
    "BadFilesError",
    "Batches",
    "DataError",
    "Dataset",
    "FolderIndex",
    "ImageFolder",
    "StreamSpec",
    "ahead",
    "augment",
    "batches",
    "channel_stats",
    "check_labels",
    "epoch_order",
    "image_folder",
    "load",
    "num_batches",
    "standardize",
    "standardize_with",
]
