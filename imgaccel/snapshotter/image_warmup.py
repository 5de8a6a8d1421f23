"""What the node daemon fetches for an image before its containers ask: the warm-up policy.

When a pull first opens an image (``lazy_layers.LazyImages``), ``warm_up`` runs in the
background:

1. it looks up the image's hot-chunk profile for the node's label and replays it
   (``reader.prefetch.replay_profile``), so a start-up's chunks are on their way first;
2. with no profile and ``record_profiles`` on, it records one: the chunks the containers'
   foreground reads needed during the first ``record_seconds``, pushed as a referrer of the
   image (``reader.profiles.push_profile``; the node's registry credentials need push rights);
3. it fetches every other chunk at full rate (``background_fetch``: "no-profile" or "always"),
   through the background share of the fetch slots, so container reads never queue behind it;
   then ``on_complete`` runs (the daemon writes the layers out as local files).

A failure at any step is logged and ends the warm-up: it only ever speeds things up. What it
did is counted in ``WarmUpCounters`` and described per image in ``WarmUpState`` for
``imgaccel node status``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from imgaccel.pusher.client import RegistryClient
from imgaccel.reader.accelerated_image import AcceleratedImage
from imgaccel.reader.prefetch import fetch_rest, replay_profile
from imgaccel.reader.profiles import build_profile, find_profile, push_profile

log = logging.getLogger(__name__)
FULL_RATE = float("inf")  # background fetch bytes/s: as fast as the background slots allow


@dataclass(frozen=True)
class WarmUp:
    """The node's warm-up policy (from ``NodeConfig``)."""

    profile_label: str | None = "startup"
    record_profiles: bool = False
    record_seconds: float = 30.0
    background_fetch: Literal["off", "no-profile", "always"] = "no-profile"


@dataclass
class WarmUpCounters:
    """Totals since the daemon started."""

    profile_replays: int = 0
    profile_chunks: int = 0
    profiles_recorded: int = 0
    background_fetches: int = 0  # images whose every chunk was fetched
    background_bytes: int = 0
    failures: int = 0


@dataclass
class WarmUpState:
    """One image's warm-up, as ``node status`` shows it."""

    profile: str = "looking up"  # "looking up", "none", "replaying", "replayed N chunks", "off", or the failure
    recording: str = "off"  # "off", "until HH:MM:SS", "pushed sha256:...", "nothing read", or the failure
    background_fetch: str = "off"  # "off", "running", "done", or the failure
    complete: bool = False  # every chunk of every layer is cached


async def warm_up(
    client: RegistryClient,
    image: AcceleratedImage,
    policy: WarmUp,
    counters: WarmUpCounters,
    state: WarmUpState,
    on_complete: Callable[[AcceleratedImage], Awaitable[None]] | None = None,
) -> None:
    """Replay or record the image's profile, then fetch the rest, as ``policy`` says."""
    profile_found = await _replay(client, image, policy, counters, state)
    recording = None
    if not profile_found and policy.record_profiles and policy.profile_label:
        recording = asyncio.create_task(_record(client, image, policy, counters, state))
    try:
        if policy.background_fetch == "always" or (policy.background_fetch == "no-profile" and not profile_found):
            await _fetch_rest(image, counters, state, on_complete)
        if recording is not None:
            await recording
    finally:
        if recording is not None and not recording.done():
            recording.cancel()


async def _replay(
    client: RegistryClient, image: AcceleratedImage, policy: WarmUp, counters: WarmUpCounters, state: WarmUpState
) -> bool:
    label = policy.profile_label
    if not label:
        state.profile = "off"
        return False
    try:
        profile = await find_profile(client, image, label)
        if profile is None:
            state.profile = "none"
            log.info("%s: no %r profile to replay", image.ref, label)
            return False
        state.profile = "replaying"
        t0 = time.monotonic()
        n = await replay_profile(image, profile)
    except Exception as e:  # a profile only speeds things up: never fail a pull on it
        counters.failures += 1
        state.profile = f"failed: {e}"
        log.warning("%s: profile %r not replayed: %s", image.ref, label, e)
        return False
    counters.profile_replays += 1
    counters.profile_chunks += n
    state.profile = f"replayed {n} chunks"
    log.info("%s: replayed profile %r: %d chunks in %.2f s", image.ref, label, n, time.monotonic() - t0)
    return True


async def _record(
    client: RegistryClient, image: AcceleratedImage, policy: WarmUp, counters: WarmUpCounters, state: WarmUpState
) -> None:
    label = policy.profile_label
    assert label is not None
    until = time.time() + policy.record_seconds
    state.recording = "until " + time.strftime("%H:%M:%S", time.localtime(until))
    await asyncio.sleep(policy.record_seconds)
    profile = build_profile(image, label)
    if not profile.chunks:
        state.recording = "nothing read"
        log.info("%s: no foreground reads in %.0f s: no profile recorded", image.ref, policy.record_seconds)
        return
    try:
        digest = await push_profile(client, image, profile)
    except Exception as e:
        counters.failures += 1
        state.recording = f"failed: {e}"
        log.warning("%s: profile %r recorded (%d chunks) but not pushed: %s", image.ref, label, len(profile.chunks), e)
        return
    counters.profiles_recorded += 1
    state.recording = f"pushed {digest}"
    log.info("%s: recorded profile %r (%d chunks), pushed as %s", image.ref, label, len(profile.chunks), digest)


async def _fetch_rest(
    image: AcceleratedImage,
    counters: WarmUpCounters,
    state: WarmUpState,
    on_complete: Callable[[AcceleratedImage], Awaitable[None]] | None,
) -> None:
    state.background_fetch = "running"
    try:
        counters.background_bytes += await fetch_rest(image, FULL_RATE)
        missing = sum(
            1 for layer in image.layers for p in range(len(layer.index.chunks)) if not layer.is_cached(p)
        )  # fmt: skip
        if missing:
            raise RuntimeError(f"{missing} chunks could not be fetched")
    except Exception as e:
        counters.failures += 1
        state.background_fetch = f"failed: {e}"
        log.warning("%s: background fetch stopped: %s", image.ref, e)
        return
    counters.background_fetches += 1
    state.background_fetch = "done"
    state.complete = True
    if on_complete is not None:
        try:
            await on_complete(image)
        except Exception as e:
            counters.failures += 1
            log.warning("%s: after the background fetch: %s", image.ref, e)
