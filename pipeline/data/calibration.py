"""Calibration data: a seeded choice of faces, preprocessed batch by batch for INC and onnxruntime."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from pipeline.core.errors import UserError
from pipeline.data.bins import ImageFolder, VerificationBin
from pipeline.data.preprocess import preprocess
from pipeline.recipe import CalibrationSection, InputSpec


def calibration_indices(num_images: int, samples: int, seed: int) -> np.ndarray:
    """``samples`` distinct image indices chosen by ``seed``, sorted (same seed, same images)."""
    if samples <= 0:
        raise UserError(f"calibration.samples must be positive, got {samples}")
    if samples > num_images:
        raise UserError(
            f"calibration.samples is {samples} but the calibration set holds only {num_images} images",
            hint="lower calibration.samples or use a larger set",
        )
    # PCG64 with a fixed seed gives the same stream on every platform and numpy version.
    rng = np.random.Generator(np.random.PCG64(seed))
    return np.sort(rng.choice(num_images, size=samples, replace=False)).astype(np.int64)


def indices_sha256(indices: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(indices, dtype="<i8").tobytes()).hexdigest()


@dataclass
class CalibrationData:
    """A seeded choice of calibration images, preprocessed batch by batch.

    Iterating yields ``({input_name: NCHW float32}, labels)``, the form INC's
    ``calib_dataloader`` takes; :meth:`ort_reader` wraps the same batches as an
    onnxruntime ``CalibrationDataReader``. With ``flip`` each batch is followed
    by its mirror image, doubling :attr:`num_samples`.
    """

    source: VerificationBin | ImageFolder
    spec: InputSpec
    samples: int
    seed: int = 0
    batch_size: int = 1
    flip: bool = False
    input_name: str = "data"
    indices: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        if self.batch_size <= 0:
            raise UserError(f"calibration.batch must be positive, got {self.batch_size}")
        self.indices = calibration_indices(self.source.num_images, self.samples, self.seed)

    @classmethod
    def from_section(
        cls, source: VerificationBin | ImageFolder, spec: InputSpec, section: CalibrationSection, input_name: str
    ) -> "CalibrationData":
        return cls(source, spec, samples=section.samples, seed=section.seed, batch_size=section.batch,
                   flip=section.flip, input_name=input_name)

    @property
    def num_samples(self) -> int:
        return len(self.indices) * (2 if self.flip else 1)

    @property
    def indices_sha256(self) -> str:
        return indices_sha256(self.indices)

    def _plan(self) -> list[tuple[int, bool]]:
        """(first index position, flipped) of each batch, in order."""
        views = (False, True) if self.flip else (False,)
        return [(s, v) for s in range(0, len(self.indices), self.batch_size) for v in views]

    def __len__(self) -> int:
        return len(self._plan())

    def arrays(self, start: int = 0, stop: int | None = None) -> Iterator[np.ndarray]:
        """The preprocessed batches ``start:stop``, in a fixed order."""
        decoded: tuple[int, np.ndarray] | None = None
        for first, flip in self._plan()[start:stop]:
            if decoded is None or decoded[0] != first:
                decoded = (first, self.source.decode_many(self.indices[first : first + self.batch_size]))
            yield preprocess(decoded[1], self.spec, flip=flip)

    def __iter__(self) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
        for x in self.arrays():
            yield {self.input_name: x}, np.zeros(len(x), dtype=np.int64)

    def ort_reader(self, input_name: str | None = None):
        """An onnxruntime ``CalibrationDataReader`` over the same batches."""
        from onnxruntime.quantization import CalibrationDataReader

        data = self
        name = input_name or self.input_name

        class _Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self._it: Iterator[np.ndarray] | None = None
                self._range: tuple[int, int | None] = (0, None)

            def get_next(self) -> dict[str, np.ndarray] | None:
                if self._it is None:
                    self._it = data.arrays(*self._range)
                x = next(self._it, None)
                return None if x is None else {name: x}

            def rewind(self) -> None:
                self._it = None

            def set_range(self, start_index: int, end_index: int) -> None:
                # onnxruntime's strided calibration reads the batches a slice at a time.
                self._range = (start_index, end_index)
                self._it = None

            def __len__(self) -> int:
                return len(data)

        return _Reader()
