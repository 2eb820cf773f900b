"""Where everything of a labels output lives; ``schema.py`` documents what each file holds.

    OUTPUT/episode=<id>/part-0.parquet   an episode's labels, moved in whole (commit.py)
    OUTPUT/_errors/<id>.parquet          its error rows
    OUTPUT/_progress/<id>.json           the marker: the episode is committed, and with which settings
    OUTPUT/_runs/<run_id>.json           one summary per run
    OUTPUT/_tmp/<run_id>/                files being written by a run; a dead run's are removed by the next
    OUTPUT/_leases/<id>.json             which live job is labelling the episode (leases.py)
"""

from __future__ import annotations

from dataclasses import dataclass

from simpsons_ray.core import storage
from simpsons_ray.labels import schema
from simpsons_ray.labels.ids import check_episode_id

PROGRESS_DIR = "_progress"
TMP_DIR = "_tmp"
LABELS_FILE = "part-0.parquet"


@dataclass(frozen=True)
class OutputLayout:
    """Where everything of a labels output lives (see schema.py for the layout)."""

    output_uri: str

    def episode_dir(self, episode_id: str) -> str:
        return storage.join(self.output_uri, f"episode={_checked(episode_id)}")

    def labels_file(self, episode_id: str) -> str:
        return storage.join(self.episode_dir(episode_id), LABELS_FILE)

    def errors_file(self, episode_id: str) -> str:
        return storage.join(self.output_uri, schema.ERRORS_DIR, f"{_checked(episode_id)}.parquet")

    def marker(self, episode_id: str) -> str:
        return storage.join(self.output_uri, PROGRESS_DIR, f"{_checked(episode_id)}.json")

    def tmp_dir(self) -> str:
        return storage.join(self.output_uri, TMP_DIR)

    def tmp_run_dir(self, run_id: str) -> str:
        return storage.join(self.tmp_dir(), run_id)

    def run_summary(self, run_id: str) -> str:
        return storage.join(self.output_uri, schema.RUNS_DIR, f"{run_id}.json")

    def remove_partial_writes(self, episode_ids: set[str]) -> None:
        """Remove what atomic local writes of these episodes left when a kill cut them short (``<name>.tmp-<hex>``).

        Only the given episodes' (this job's, by lease): another live job may be
        in the middle of such a write for its own.
        """
        for folder in (schema.ERRORS_DIR, PROGRESS_DIR):
            for entry in storage.list_files(storage.join(self.output_uri, folder), recursive=False):
                name, tmp, _ = entry.relpath.partition(".tmp-")
                if tmp and name.rsplit(".", 1)[0] in episode_ids:
                    storage.delete(entry.uri)

    def remove_dead_runs(self, live_runs: set[str]) -> list[str]:
        """Remove the temporary files of runs that are not live (killed or failed), and abort their open S3 uploads.

        (An upload that was never completed is no object yet, so it is found by
        listing the uploads, not the files.)
        """
        storage.abort_uploads(self.tmp_dir(), keep=lambda path: path.split("/", 1)[0] in live_runs)
        removed = []
        for name, is_dir in storage.list_dir(self.tmp_dir()):
            if is_dir and name not in live_runs:
                storage.delete(self.tmp_run_dir(name))
                removed.append(name)
        return removed

    def remove_episode(self, episode_id: str) -> None:
        """Remove an episode's labels, errors and marker (marker first: never 'done' without rows)."""
        storage.delete(self.marker(episode_id))
        storage.delete(self.episode_dir(episode_id))
        storage.delete(self.errors_file(episode_id))


def _checked(episode_id: str) -> str:
    """The id, if it is one (labels.ids): a path is never built from anything else."""
    why = check_episode_id(episode_id)
    if why:
        raise ValueError(f"{episode_id!r} is not an episode id: {why}")
    return episode_id
