"""Downloads from the HuggingFace Hub, shared by export (checkpoints) and serve (pre-exported ONNX).

huggingface_hub already honours ``HF_TOKEN``, ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE``; this module only
turns its exceptions into ours, so that the CLI and the server say what went wrong in one sentence.
"""

from __future__ import annotations

import re
from pathlib import Path

from fastllm.errors import SourceNotFoundError

# "org/name" as the hub spells repo ids; anything else is treated as a local path.
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_repo_id(text: str) -> bool:
    return bool(_REPO_ID.match(text)) and not text.endswith((".gguf", ".onnx", ".json"))


def download(
    repo_id: str,
    *,
    revision: str | None = None,
    token: str | None = None,
    allow_patterns: list[str] | None = None,
) -> Path:
    """Snapshot a repo into the HF cache and return its local folder."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        folder = snapshot_download(
            repo_id, revision=revision, token=token, allow_patterns=allow_patterns
        )
    except GatedRepoError:
        raise SourceNotFoundError(
            f"{repo_id} is gated: accept its licence on the hub and set HF_TOKEN to a token with access",
            code="gated_repo",
        ) from None
    except RepositoryNotFoundError:
        raise SourceNotFoundError(
            f"model {repo_id!r} was not found on the hub (or it is private: set HF_TOKEN)"
        ) from None
    except RevisionNotFoundError:
        raise SourceNotFoundError(f"revision {revision!r} of {repo_id} does not exist") from None
    except LocalEntryNotFoundError:
        raise SourceNotFoundError(
            f"{repo_id} is not in the local cache and the hub cannot be reached "
            "(offline mode or no network); download it once while online"
        ) from None
    except HfHubHTTPError as exc:
        raise SourceNotFoundError(f"the hub refused {repo_id}: {exc}") from None
    return Path(folder)
