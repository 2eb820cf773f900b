"""Which episodes of a labels output are still to do: their markers, the settings they were made with, their sources now."""

from __future__ import annotations

from typing import Any

from simpsons_ray.core import storage
from simpsons_ray.core.errors import UserError
from simpsons_ray.label import episodes as frames_lib
from simpsons_ray.label.settings import LabelSettings
from simpsons_ray.labels.layout import OutputLayout


def split_done(
    layout: OutputLayout, episodes: list[frames_lib.Episode], settings: LabelSettings, overwrite: bool
) -> tuple[list[frames_lib.Episode], list[frames_lib.Episode], list[str]]:
    """(episodes to label, episodes already labelled with these settings, ids of those whose source changed since).

    An episode whose frames or video changed since it was labelled is reported,
    and relabelled only with ``overwrite``.
    """
    if overwrite:
        return list(episodes), [], []
    markers = dict(zip((e.episode_id for e in episodes), storage.in_threads(lambda e: _read_marker(layout, e), episodes)))
    todo, done, clashes = [], [], []
    for episode in episodes:
        marker = markers[episode.episode_id]
        if marker is None:
            todo.append(episode)
            continue
        diff = settings.differences(marker, episode.kind)
        if diff:
            clashes.append(f"{episode.episode_id} ({', '.join(diff)})")
        else:
            done.append(episode)
    if clashes:
        raise UserError(
            f"{layout.output_uri} already holds labels made with other settings for episode(s) {'; '.join(clashes[:3])}"
            f"{' and more' if len(clashes) > 3 else ''}: pass --overwrite to relabel them, or choose another --output."
        )
    # Markers written before fingerprints existed have none: nothing to compare.
    fingerprinted = [e for e in done if markers[e.episode_id].get("source_fingerprint")]
    now = dict(zip((e.episode_id for e in fingerprinted), storage.in_threads(frames_lib.fingerprint, fingerprinted)))
    stale = sorted(e.episode_id for e in fingerprinted if now[e.episode_id] != markers[e.episode_id]["source_fingerprint"])
    return todo, done, stale


def _read_marker(layout: OutputLayout, episode: frames_lib.Episode) -> dict[str, Any] | None:
    try:
        return storage.read_json(layout.marker(episode.episode_id))
    except FileNotFoundError:
        return None
