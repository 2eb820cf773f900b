"""Where everything of a labels output lives; ``schema.py`` documents what each file holds.

    OUTPUT/episode=<id>/part-0.parquet   an episode's labels, moved in whole (commit.py)
    OUTPUT/_errors/<id>.parquet          its error rows
    OUTPUT/_progress/<id>.json           the marker: the episode is committed, and with which settings
    OUTPUT/_runs/<run_id>.json           one summary per run
    OUTPUT/_tmp/<run_id>/                files being written; anything here is from an unfinished run
"""

from __future__ import annotations

from dataclasses import dataclass

from simpsons_ray import schema, storage

PROGRESS_DIR = "_progress"
TMP_DIR = "_tmp"
LABELS_FILE = "part-0.parquet"


@dataclass(frozen=True)
class OutputLayout:
    """Where everything of a labels output lives (see schema.py for the layout)."""

    output_uri: str

    def episode_dir(self, episode_id: str) -> str:
        return storage.join(self.output_uri, f"episode={episode_id}")

    def labels_file(self, episode_id: str) -> str:
        return storage.join(self.episode_dir(episode_id), LABELS_FILE)

    def errors_file(self, episode_id: str) -> str:
        return storage.join(self.output_uri, schema.ERRORS_DIR, f"{episode_id}.parquet")

    def marker(self, episode_id: str) -> str:
        return storage.join(self.output_uri, PROGRESS_DIR, f"{episode_id}.json")

    def tmp_dir(self) -> str:
        return storage.join(self.output_uri, TMP_DIR)

    def tmp_run_dir(self, run_id: str) -> str:
        return storage.join(self.tmp_dir(), run_id)

    def run_summary(self, run_id: str) -> str:
        return storage.join(self.output_uri, schema.RUNS_DIR, f"{run_id}.json")

    def remove_partial_writes(self) -> None:
        """Remove the temp files of atomic local writes that a kill cut short (``<name>.tmp-<hex>``)."""
        for folder in (schema.ERRORS_DIR, PROGRESS_DIR):
            for entry in storage.list_files(storage.join(self.output_uri, folder), recursive=False):
                if ".tmp-" in entry.relpath:
                    storage.delete(entry.uri)

    def remove_episode(self, episode_id: str) -> None:
        """Remove an episode's labels, errors and marker (marker first: never 'done' without rows)."""
        storage.delete(self.marker(episode_id))
        storage.delete(self.episode_dir(episode_id))
        storage.delete(self.errors_file(episode_id))
