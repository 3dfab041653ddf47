"""NVDEC decoding (extractors.media.NvdecVideo) where a GPU with NVDEC is: skipped elsewhere."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from conftest import CORPUS

from extractors import media


def _digests(path: Path, reuse: bool) -> list[str]:
    """sha1 of every RGB frame NvdecVideo gives of ``path`` (at most 640 px), on the 30 fps grid."""
    import cv2

    cap = cv2.VideoCapture(str(path))
    w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
    cap.release()
    v = media.NvdecVideo(str(path), w, h, 640, reuse=reuse)
    return [hashlib.sha1(f.cpu().numpy().tobytes()).hexdigest()
            for _, f in v.iter_frames(np.arange(v.timeline.n_out))]


def reused_decoder_check(videos: list[Path]) -> dict:
    """Each video decoded by a decoder of its own, then all of them in turn (twice, so the stream changes
    size and codec both ways) by one thread's kept decoder: the same frames, and the same decoder kept
    throughout (reconfigured, never made anew). Returns {video name: frames}."""
    fresh = {v: _digests(v, False) for v in videos}
    media._NVDEC_KEPT.dec = None
    kept = None
    for v in videos + videos[::-1]:
        got = _digests(v, True)
        assert len(got) == len(fresh[v]) > 0, (v.name, len(got), len(fresh[v]))
        assert got == fresh[v], f"{v.name}: {sum(a != b for a, b in zip(got, fresh[v]))} frames differ"
        now = media._NVDEC_KEPT.dec[1]
        assert kept is None or now is kept, f"{v.name}: a new decoder was made"
        kept = now
    return {v.name: len(fresh[v]) for v in videos}


@pytest.mark.skipif(not media.nvdec_available(), reason="needs NVDEC (CUDA, PyNvVideoCodec, libnvcuvid)")
def test_a_kept_nvdec_decoder_gives_each_video_a_new_decoders_frames(real_dir):
    """A worker keeps its NVDEC decoder from source to source (NVDEC_REUSE): reconfigured for a stream of
    another size (the real videos: 512 px, 1280x720, 704x1216) or codec (the corpus's HEVC), it gives every
    frame a decoder made for that video gives, byte for byte."""
    videos = sorted(real_dir.glob("*.mp4"))
    if CORPUS.is_dir():
        videos += sorted(CORPUS.glob("latentsync_demo*.mp4"))[:1] + sorted(CORPUS.glob("edtalk_pose*.mp4"))[:1]
    reused_decoder_check(videos)
