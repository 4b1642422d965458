"""What a running `preflab serve` is made of, handed to every tab in one object.

`annotate/serve.py` is the only place that builds these objects (the composition
root); the web layer receives a `ServeContext` and never constructs services itself.
Fields are typed `Any` (their classes named in the comments) so that this module
imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class ServeContext:
    service: Any  # annotate.service.Service: the annotation workflow
    data: str  # the store's target: a directory or a postgresql:// URL
    state_dir: Path  # local files that are not votes (arena.json, pair caches)
    runs_dir: Path  # where trainings started from the page go (Train tab)
    queue: Any  # annotate.queue.AssignmentQueue
    generator: Any = None  # annotate.pair_generator.Generator, when serving models (--model)
    launcher: Any = None  # annotate.launcher.Launcher: trainer subprocesses
    reviewer: Any = None  # annotate.review.Reviewer: reward-model scoring of the votes
    user_admin: Any = None  # annotate.user_admin.UserAdmin: the Users tab (with --auth only)
    annotator_review: Any = None  # annotate.annotator_review.AnnotatorReview: the flags (Dashboard)
    exports: Any = None  # annotate.web.downloads.Exports: the admins' downloads of exports
    chat: Any = None  # annotate.chat.ChatService, with serve --chat: the Chat tab and /chat
    guidelines: str = ""  # Markdown shown in the Guidelines tab
    title: str = "preflab"
