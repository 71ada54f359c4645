"""Engine sets: one coarse + fine pair per protocol family, chosen per study by the roles of its series.

A set is a folder under the engines folder (``engines/<name>/``) with its own ``engines.json``,
``model_config.json`` (whose ``input_roles`` say which series it takes) and accuracy table.
:data:`CATALOGUE` says what each shipped set is for and which synthetic protocols train it;
what a set takes is read from its own config, so a user's set needs no entry here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SetSpec:
    name: str
    input_roles: tuple  # per input channel, the roles it accepts in order of preference
    protocols: tuple  # synthetic protocols (kneebatch.synth.cohort.PROTOCOLS) whose studies train it
    what: str  # one line for ``engines list`` and the docs

    def roles_json(self) -> list:
        return [list(r) for r in self.input_roles]


CATALOGUE = {s.name: s for s in (
    SetSpec("t1-t2", (("T1",), ("T2FS", "T2")), ("clinical",), "sagittal T1 + (fat-suppressed) T2 TSE: the paper's protocol"),
    SetSpec("dess-pdfs", (("DESS",), ("PDFS",)), ("oai",), "the OAI: 3-D DESS (WE) + 2-D IW/PD-TSE-FS"),
    SetSpec("dess", (("DESS",),), ("skmtea", "oai"), "DESS alone: SKM-TEA's qDESS, the OAI's DESS"),
    SetSpec("pdfs", (("PDFS",),), ("pdfs",), "one sagittal PD/IW TSE with fat suppression"),
    SetSpec("t2fs", (("T2FS",),), ("t2fs",), "one sagittal T2 TSE with fat suppression"),
)}
# synth's protocol names lead to the set that segments them
BY_PROTOCOL = {"clinical": "t1-t2", "oai": "dess-pdfs", "skmtea": "dess", "pdfs": "pdfs", "t2fs": "t2fs"}


def spec_for(name: str) -> SetSpec:
    """A set by its name, or by the synthetic protocol it segments (``oai`` -> ``dess-pdfs``)."""
    name = BY_PROTOCOL.get(name, name)
    if name not in CATALOGUE:
        raise ValueError(f"unknown engine set or protocol {name!r}; sets: {', '.join(CATALOGUE)}; "
                         f"protocols: {', '.join(BY_PROTOCOL)}")
    return CATALOGUE[name]
