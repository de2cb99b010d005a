"""The prompt text every engine-level benchmark feeds, ours and the peers' alike (no imports: peers' venvs)."""

TEXT = ("The history of computing is a story of abstraction layered upon abstraction, from vacuum tubes to "
        "transistors, from machine code to high level languages, and from single machines to vast networks. ") * 20
