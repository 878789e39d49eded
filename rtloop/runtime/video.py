"""--video: the episode's frames, upright, as an mp4 (OpenCV, installed with LIBERO's dependencies) or a
GIF (Pillow). Frames are written between episodes, never from the tick path."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rtloop.errors import InputError

SUFFIXES = (".mp4", ".avi", ".gif")


def check_video_path(path: Path) -> None:
    if path.suffix.lower() not in SUFFIXES:
        raise InputError(f"--video {path}: unsupported format; use one of {', '.join(SUFFIXES)}")


def upright(frame: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(frame[::-1, ::-1])  # LIBERO renders rotated by 180 degrees


class VideoWriter:
    def __init__(self, path: Path, fps: float) -> None:
        check_video_path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.fps = fps
        self._cv2_writer = None
        self._gif_frames: list = []  # Pillow writes a GIF in one go

    def write(self, frames: list[np.ndarray]) -> None:
        if self.path.suffix.lower() == ".gif":
            from PIL import Image

            self._gif_frames += [Image.fromarray(upright(f)) for f in frames]
            return
        import cv2

        for frame in frames:
            if self._cv2_writer is None:
                fourcc = cv2.VideoWriter_fourcc(*("mp4v" if self.path.suffix.lower() == ".mp4" else "MJPG"))
                h, w = frame.shape[:2]
                self._cv2_writer = cv2.VideoWriter(str(self.path), fourcc, self.fps, (w, h))
            self._cv2_writer.write(cv2.cvtColor(upright(frame), cv2.COLOR_RGB2BGR))

    def close(self) -> None:
        if self._cv2_writer is not None:
            self._cv2_writer.release()
        if self._gif_frames:
            first, *rest = self._gif_frames
            first.save(self.path, save_all=True, append_images=rest, duration=int(1000 / self.fps), loop=0)
