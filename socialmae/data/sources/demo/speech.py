"""The demo's speech: CREMA-D sentences spoken by espeak-ng (through ctypes) with prosody set
by the emotion label, resampled to 16 kHz mono, and its loudness per video frame.
"""

from __future__ import annotations

import _ctypes
import ctypes
import logging
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import signal

from socialmae.tasks import EMOTIONS

log = logging.getLogger(__name__)


SAMPLE_RATE = 16_000


# CREMA-D sentence codes and texts.
SENTENCES: dict[str, str] = {
    "IEO": "It's eleven o'clock",
    "TIE": "That is exactly what happened",
    "IOM": "I'm on my way to the meeting",
    "IWW": "I wonder what this is about",
    "TAI": "The airplane is almost full",
    "MTI": "Maybe tomorrow it will be cold",
    "IWL": "I would like a new alarm clock",
    "ITH": "I think I have a doctor's appointment",
    "DFA": "Don't forget a jacket",
    "ITS": "I think I've seen this before",
    "TSI": "The surface is slick",
    "WSI": "We'll stop in a couple of minutes",
}


EMOTION_CODES = dict(zip(EMOTIONS, ("ANG", "DIS", "FEA", "HAP", "NEU", "SAD"), strict=True))


@dataclass(frozen=True)
class Prosody:
    """espeak-ng settings: pitch and range 0-100, rate in words per minute, volume 0-200."""

    pitch: float
    range: float
    rate: float
    volume: float


EMOTION_PROSODY: dict[str, Prosody] = {
    "anger": Prosody(pitch=60, range=85, rate=210, volume=200),
    "disgust": Prosody(pitch=30, range=35, rate=125, volume=80),
    "fear": Prosody(pitch=90, range=65, rate=240, volume=125),
    "happiness": Prosody(pitch=75, range=100, rate=185, volume=160),
    "neutral": Prosody(pitch=45, range=25, rate=160, volume=100),
    "sadness": Prosody(pitch=15, range=5, rate=100, volume=45),
}


_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)


_SIGNATURES: dict[str, tuple[list[Any], Any]] = {
    "espeak_Initialize": (
        [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int],
        ctypes.c_int,
    ),
    "espeak_SetSynthCallback": ([_CALLBACK], None),
    "espeak_SetVoiceByName": ([ctypes.c_char_p], ctypes.c_int),
    "espeak_SetParameter": ([ctypes.c_int, ctypes.c_int, ctypes.c_int], ctypes.c_int),
    "espeak_ng_SetRandSeed": ([ctypes.c_long], None),
    "espeak_Synth": (
        [
            ctypes.c_char_p,  # text
            ctypes.c_size_t,  # size
            ctypes.c_uint,  # position
            ctypes.c_int,  # position_type
            ctypes.c_uint,  # end_position
            ctypes.c_uint,  # flags
            ctypes.c_void_p,  # unique_identifier
            ctypes.c_void_p,  # user_data
        ],
        ctypes.c_int,
    ),
    "espeak_Terminate": ([], ctypes.c_int),
}


class _Espeak:
    """espeak-ng (the ``espeakng-loader`` wheel) through ctypes, in synchronous mode.

    The library keeps synthesis state in C statics that no API call resets (e.g. the phase of
    its pitch flutter), so an utterance would depend on everything spoken before it in the
    process. To make equal arguments give equal samples, every utterance gets a freshly
    loaded and initialised library (``dlopen``/``espeak_Initialize`` ... ``espeak_Terminate``
    /``dlclose``: about 5 ms). The library's path is checked once per process.
    """

    _lock = threading.Lock()
    _paths: tuple[str, str] | None = None

    def __init__(self) -> None:
        self._chunks: list[np.ndarray] = []
        self._callback = _CALLBACK(self._collect)  # referenced while the library may call it

    @classmethod
    def paths(cls) -> tuple[str, str]:
        """(shared library, data directory); a RuntimeError when espeak-ng is unusable."""
        if cls._paths is None:
            try:
                import espeakng_loader

                library, data = espeakng_loader.get_library_path(), espeakng_loader.get_data_path()
            except (ImportError, RuntimeError) as exc:
                raise RuntimeError(f"espeak-ng (espeakng-loader) is not available: {exc}") from exc
            if not Path(library).is_file():
                raise RuntimeError(f"espeak-ng library not found at {library}")
            cls._paths = (library, data)
        return cls._paths

    def _collect(self, wav: Any, count: int, events: Any) -> int:
        if wav and count > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(count,)).copy())
        return 0

    def synth(
        self, text: str, voice: str, pitch: int, range_: int, rate: int, volume: int, seed: int
    ) -> tuple[np.ndarray, int]:
        """(16-bit samples ``[N]`` int16, sample rate); same arguments, same samples."""
        library, data = self.paths()
        with self._lock:
            try:
                lib = ctypes.CDLL(library)
            except OSError as exc:
                raise RuntimeError(
                    f"espeak-ng library cannot be loaded ({library}): {exc}"
                ) from exc
            try:
                for name, (argtypes, restype) in _SIGNATURES.items():
                    getattr(lib, name).argtypes = argtypes
                    getattr(lib, name).restype = restype
                # AUDIO_OUTPUT_SYNCHRONOUS = 2: espeak_Synth returns when the callback has
                # received every sample.
                sample_rate = lib.espeak_Initialize(2, 0, data.encode(), 0)
                if sample_rate <= 0:
                    raise RuntimeError(f"espeak_Initialize failed ({sample_rate}) with {data}")
                try:
                    lib.espeak_SetSynthCallback(self._callback)
                    if lib.espeak_SetVoiceByName(voice.encode()) != 0:
                        raise RuntimeError(f"espeak-ng has no voice {voice!r}")
                    # espeakRATE=1, espeakVOLUME=2, espeakPITCH=3, espeakRANGE=4 (absolute).
                    for key, value in ((1, rate), (2, volume), (3, pitch), (4, range_)):
                        lib.espeak_SetParameter(key, int(value), 0)
                    lib.espeak_ng_SetRandSeed(seed)  # breath noise
                    self._chunks = []
                    encoded = text.encode() + b"\0"
                    # POS_CHARACTER = 1, espeakCHARS_UTF8 = 1.
                    err = lib.espeak_Synth(encoded, len(encoded), 0, 1, 0, 1, None, None)
                    if err != 0:
                        raise RuntimeError(f"espeak_Synth failed ({err}) for {text!r}")
                    chunks, self._chunks = self._chunks, []
                finally:
                    lib.espeak_Terminate()
            finally:
                handle = lib._handle
                del lib
                _ctypes.dlclose(handle)
        samples = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int16)
        return samples, sample_rate


def synthesize_speech(
    text: str,
    *,
    voice: str = "en-us",
    pitch: float = 50,
    range_: float = 50,
    rate: float = 175,
    volume: float = 100,
    seconds: float | None = None,
    lead: float = 0.0,
    sample_rate: int = SAMPLE_RATE,
    seed: int = 0,
) -> np.ndarray:
    """Speak ``text`` with espeak-ng: mono float32 ``[N]`` in [-1, 1] at ``sample_rate``.

    ``lead`` seconds of silence come first; with ``seconds`` the result is padded with
    silence or cut to exactly ``round(seconds * sample_rate)`` samples. espeak-ng's noise
    generator is seeded with ``seed``, so equal arguments give equal samples.
    """
    raw, rate_in = _Espeak().synth(
        text, voice, round(pitch), round(range_), round(rate), round(volume), seed
    )
    audio = raw.astype(np.float32) / 32768.0
    if sample_rate != rate_in:
        g = math.gcd(sample_rate, rate_in)
        audio = signal.resample_poly(audio, sample_rate // g, rate_in // g)
    audio = np.concatenate([np.zeros(round(lead * sample_rate), np.float32), audio])
    if seconds is not None:
        n = round(seconds * sample_rate)
        audio = np.pad(audio[:n], (0, max(0, n - audio.size)))
    return np.clip(audio, -1.0, 1.0).astype(np.float32)


def frame_loudness(audio: np.ndarray, fps: float, frames: int, sample_rate: int = SAMPLE_RATE):
    """RMS of ``audio`` ``[N]`` over each video frame's interval: ``[frames]`` float32."""
    edges = np.round(np.arange(frames + 1) * sample_rate / fps).astype(int)
    out = np.zeros(frames, dtype=np.float32)
    for t in range(frames):
        chunk = audio[edges[t] : edges[t + 1]]
        out[t] = float(np.sqrt(np.mean(np.square(chunk, dtype=np.float64)))) if chunk.size else 0
    return out
