"""A starting gateway's warm-up utterance: one phrase spoken through its pipeline in a
throwaway session, so that the first client session's first utterance starts from the playout
delay this deployment measured (the pipeline's registry remembers what closed sessions
needed, streaming/playout.py), not from `playout_initial_ms`."""

from __future__ import annotations

import asyncio
import logging

from ray_lipsync.streaming.pipeline import Pipeline

logger = logging.getLogger(__name__)

WARM_TEXT = "Hi there."  # what a starting gateway says in a throwaway session (~0.6 s)


async def speak_once(pipeline: Pipeline, timeout_s: float = 15.0) -> bool:
    """Say WARM_TEXT in a new session of `pipeline` until its last frame is out, then close
    it. False (and a warning) if the pipeline could not do it in `timeout_s`."""
    from ray_lipsync.tts import Synthesizer

    session = None
    try:
        async with asyncio.timeout(timeout_s):
            speech = await asyncio.to_thread(lambda: Synthesizer().synthesize(WARM_TEXT))
            session = await pipeline.create_session()
            utterance = await session.push_audio(speech)
            async for frame in session.frames():
                if frame.frame_index >= utterance.end_frame:
                    break
        return True
    except Exception:  # noqa: BLE001 - a slow or failing pipeline must not stop the start
        logger.warning("the warm-up utterance did not complete; first utterances start at "
                       "playout_initial_ms", exc_info=True)
        return False
    finally:
        if session is not None:
            await pipeline.close_session(session.session_id)
