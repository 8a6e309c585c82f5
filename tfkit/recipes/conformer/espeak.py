"""Speech synthesis with eSpeak NG (GPL-3.0), for the built-in speech data (:mod:`.data`).

The PyPI package ``espeakng-loader`` ships the eSpeak NG shared library with its voice data; we call
its C API through ``ctypes`` in synchronous mode, where ``espeak_Synth`` returns after handing every
chunk of 16-bit samples to our callback. The library keeps one global state, so one process has one
synthesizer.
"""

from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path

import numpy as np

from tfkit.errors import TfkitError

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000  # report errors instead of ending the process
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_RATE, _PITCH, _RANGE = 1, 3, 4  # espeak_PARAMETER
_Callback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class Synthesizer:
    def __init__(self) -> None:
        import espeakng_loader

        self.data_path = Path(espeakng_loader.get_data_path())
        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [
            ctypes.c_char_p,
            ctypes.c_size_t,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        self.sample_rate = lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, 0, str(self.data_path).encode(), _INITIALIZE_DONT_EXIT
        )
        if self.sample_rate <= 0:
            raise TfkitError(f"eSpeak NG failed to start (data at {self.data_path})")
        self._chunks: list[np.ndarray] = []
        self._callback = _Callback(self._receive)  # kept referenced: the library calls it later
        lib.espeak_SetSynthCallback(self._callback)
        self.lib = lib

    def _receive(self, samples, count: int, events) -> int:
        if count > 0:
            self._chunks.append(np.ctypeslib.as_array(samples, shape=(count,)).copy())
        return 0  # go on

    def variants(self) -> list[str]:
        """The voice variants (timbre, pitch range, breathiness) any language voice can take."""
        return sorted(p.name for p in (self.data_path / "voices" / "!v").iterdir() if p.is_file())

    def speak(self, text: str, voice: str, rate: int = 175, pitch: int = 50, pitch_range: int = 50) -> np.ndarray:
        """``text`` spoken by ``voice`` (e.g. "en-us+m3") at ``rate`` words per minute, ``pitch`` 0..100
        and ``pitch_range`` 0..100 (0 a monotone), as float32 samples in [-1, 1] at :attr:`sample_rate`;
        the defaults are the `espeak-ng` command's."""
        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise TfkitError(f"eSpeak NG has no voice '{voice}'")
        self.lib.espeak_SetParameter(_RATE, rate, 0)
        self.lib.espeak_SetParameter(_PITCH, pitch, 0)
        self.lib.espeak_SetParameter(_RANGE, pitch_range, 0)
        encoded = text.encode()
        self._chunks = []
        if self.lib.espeak_Synth(encoded, len(encoded) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None) != 0:
            raise TfkitError(f"eSpeak NG could not speak {text!r}")
        return np.concatenate(self._chunks).astype(np.float32) / 32768.0


@cache
def synthesizer() -> Synthesizer:
    return Synthesizer()
