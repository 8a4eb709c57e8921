"""The embedded offline demo dataset: real faces that speak synthetic emotional speech.

Everything comes from installed wheels, nothing is downloaded:

* faces: the astronaut photo (Eileen Collins, ``skimage.data.astronaut``), Grace Hopper
  (matplotlib's ``grace_hopper.jpg``) and six faces of ``skimage.data.lfw_subset`` (25x25
  grayscale Labeled Faces in the Wild crops, upscaled 4.5x, sharpened and sepia-toned, their
  padding blurred into a background). Each sits in a ``size x size`` frame with its face box
  52% (photos) or 56% (LFW) of the frame high.
* speech: the 12 CREMA-D sentences spoken by espeak-ng (the ``espeakng-loader`` wheel, called
  through ctypes), with rate, volume, pitch and pitch range set by the emotion label (plus a
  per-identity voice and small per-clip jitter), resampled to 16 kHz mono.
* animation: the jaw opens with the speech loudness (RMS per video frame) and a dark mouth
  appears between the lips; brows, eyes, mouth corners and head motion follow the label
  (anger: lowered brows and a fast small head shake; happiness: raised mouth corners and a
  nod; sadness: lowered corners and a slow droop; fear: raised brows, widened eyes, the head
  pulled up, a tremor; disgust: a one-sided lip raise and a turn away; neutral: still), all
  as smooth warps of the photo (``scipy.ndimage.map_coordinates``).

Landmarks (face box, eyes, nose, mouth corners) of each photo were measured once with the
RetinaFace MobileNet-0.25 detector the crop stage uses and are stored below.
"""

from socialmae.data.sources.demo.animation import EXPRESSIONS, Expression, render_frames
from socialmae.data.sources.demo.faces import (
    FACE_HEIGHT,
    IDENTITIES,
    LFW_FACE_HEIGHT,
    FaceLayout,
    Identity,
    face_layout,
    get_identity,
    identity_names,
    voice_kind,
)
from socialmae.data.sources.demo.speech import (
    EMOTION_CODES,
    EMOTION_PROSODY,
    SAMPLE_RATE,
    SENTENCES,
    Prosody,
    frame_loudness,
    synthesize_speech,
)
from socialmae.data.sources.demo.writer import (
    DATASET,
    ClipSpec,
    demo_specs,
    make_clip,
    prepare_demo,
    write_clip,
)

__all__ = [
    "DATASET",
    "EMOTION_CODES",
    "EMOTION_PROSODY",
    "EXPRESSIONS",
    "FACE_HEIGHT",
    "IDENTITIES",
    "LFW_FACE_HEIGHT",
    "SAMPLE_RATE",
    "SENTENCES",
    "ClipSpec",
    "Expression",
    "FaceLayout",
    "Identity",
    "Prosody",
    "demo_specs",
    "face_layout",
    "frame_loudness",
    "get_identity",
    "identity_names",
    "make_clip",
    "prepare_demo",
    "render_frames",
    "synthesize_speech",
    "voice_kind",
    "write_clip",
]
