"""The contrast role of an MR series from its DICOM headers: T1, T2, T2FS, PD, PDFS, DESS, GRE3D or other.

Physics first, words second. The evidence, in the order it is trusted:

1. what the scanner says it ran: ScanningSequence (SE, GR, IR, EP, RM), SequenceVariant,
   ScanOptions (fat suppression flags), MRAcquisitionType and, on Siemens, the SequenceName
   (``*tse2d1_5``, ``*fl3d1``, ``*de3d1``...);
2. the timings: TR, TE, TI and the flip angle;
3. the words of SeriesDescription and ProtocolName ("PD FS", "DESS", "SPGR", "STIR"...), which
   confirm, break ties where the physics is ambiguous, and stand alone only where the physics
   is missing (anonymised or converted data without sequence tags).

Vendor conventions this relies on (see tests/test_roles.py for the headers, with their sources):

* Siemens: SequenceName ``*de3d1`` is DESS, ``*tse2d…``/``*se2d…``/``*spc3d…`` spin echo,
  ``*tir2d…`` TIRM/STIR, ``*fl3d…``/``*fi3d…``/``*me2d…`` gradient echo, ``*ep…`` EPI;
  ScanOptions ``FS`` is fat saturation, ``WE`` water excitation; ``SAT1``/``SAT2`` are
  spatial saturation bands, not fat suppression.
* GE: ScanOptions carry ``…_GEMS`` words (``FAST_GEMS`` is fast spin echo, not fat
  suppression) and ``FS`` for fat saturation; the pulse sequence name lives in a private
  tag, so SequenceName is usually empty. GE's qDESS (SKM-TEA) is a research sequence:
  ScanningSequence ``RM``, SequenceVariant ``NONE``, TR ≈ 18–20 ms, TE ≈ 6 ms, flip 20°,
  SeriesDescription "Sag DESS …" — its timings are those of a spoiled gradient echo, so
  without the word "DESS" it is GRE3D.
* Philips: ScanOptions ``FS`` for SPIR/SPAIR fat suppression; no SequenceName; words
  ``SPIR``, ``SPAIR``, ``ProSet``/``WATS`` (water-selective excitation) and ``PDW``/``T1W``/``T2W``
  in the description. Philips has no DESS product.

Decisions (documented here because they are choices, not facts):

* T1 with fat suppression stays ``T1`` (there is no T1FS role).
* Inversion recovery of any kind (STIR, TIRM, FLAIR, MPRAGE, IR-prepared SPGR) is ``other``:
  its contrast is set by the inversion, not by TR/TE. An ``IR`` flag that comes with
  SPAIR/SPIR words and no STIR word is read as the fat-suppression prepulse, not as STIR.
* Diffusion/EPI, parameter maps (T2 map, T1rho…) and localizers are ``other``.
* 2-D gradient echo (2-D MEDIC/MERGE, T2*) is ``other``; ``GRE3D`` needs a 3-D (or unknown)
  acquisition. 3-D spin echo (SPACE, CUBE, VISTA) is weighted like 2-D spin echo, never GRE3D.
* Spin-echo weighting: TR < 1000 ms with TE < 30 ms is T1; TR ≥ 1000 ms is PD for TE < 40 ms
  and T2 for TE ≥ 60 ms; between, the words decide (T2 / PD), else TE ≥ 50 ms is T2.
  The TR 800–1200 ms band with short TE is likewise word-decided (T1 / PD), else split at 1000.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # dicom.py imports this module: no runtime import back
    from kneebatch.ingest.dicom import SliceHeader

ROLES = ("T1", "T2", "T2FS", "PD", "PDFS", "DESS", "GRE3D", "other")

# ------------------------------------------------------------------ vocabulary
# ScanOptions flags that mean fat suppression (chemical saturation, SPIR/SPAIR, water excitation)
FAT_FLAGS = frozenset({"FS", "SFS", "FAT_SAT", "FATSAT", "SPIR", "SPAIR", "WE", "CHESS", "PROSET", "WATS"})
# description/protocol words for fat suppression (water excitation counts)
FAT_WORDS = frozenset({"fs", "fatsat", "fsat", "fatsup", "fatsupp", "spair", "spir", "we", "wats", "watsc",
                       "proset", "chess"})
FAT_PHRASES = ("fat sat", "fat supp", "fat suppressed", "water exc", "water sel")
NO_FAT_WORDS = frozenset({"nfs", "nofs", "nonfs"})
NO_FAT_PHRASES = ("no fs", "non fs", "w o fs", "wo fs", "without fs", "no fat sat")

PD_WORDS = frozenset({"pd", "pdw", "dp", "iw", "im", "inter", "intermediate", "proton"})
T2_WORDS = frozenset({"t2", "t2w"})
T1_WORDS = frozenset({"t1", "t1w"})
SE_WORDS = frozenset({"se", "tse", "fse", "frfse", "ssfse", "fsexl", "xl", "space", "spc", "cube", "vista",
                      "haste", "blade", "propeller", "multivane", "restore", "drive", "tgse"})
GRE_WORDS = frozenset({"gre", "fgre", "efgre", "flash", "fl3d", "spgr", "fspgr", "ffe", "t1ffe", "t2ffe", "vibe",
                       "medic", "merge", "thrive", "wats", "watsc", "fisp", "psif", "trufi", "fiesta", "grass",
                       "swi", "swan", "t2star", "mgre", "megre"})
IR_WORDS = frozenset({"stir", "tirm", "tir", "ir", "flair", "mprage", "mp2rage", "psir", "fastir"})
DIFFUSION_WORDS = frozenset({"dwi", "dti", "diff", "diffusion", "adc", "trace", "tracew", "ep2d", "resolve", "ivim",
                             "dki", "epi", "bold"})
MAP_WORDS = frozenset({"map", "maps", "mapping", "t2map", "t1map", "t1rho", "mese", "cartigram",
                       "relaxometry", "mapit"})
LOCALIZER_WORDS = frozenset({"localizer", "localiser", "loc", "scout", "survey", "tripilot", "3plane", "aahead",
                             "aascout"})
DERIVED_TYPES = frozenset({"DIFFUSION", "ADC", "TRACEW", "TRACE", "EADC", "FA", "LOCALIZER", "T2_MAP", "T1_MAP",
                           "MAP"})
DESS_RE = re.compile(r"(?<![a-z])(?:q|mfast|fast|3d)?dess")

# Siemens SequenceName prefixes (after the leading '*'): the family of the sequence
SIEMENS_PREFIXES = (  # longest first; a prefix must be followed by a digit, 'r', 'b' or '_'
    ("tfl", "GR"), ("tfi", "GR"), ("tir", "IR"), ("tse", "SE"), ("tgse", "SE"), ("spc", "SE"), ("swi", "GR"),
    ("psif", "GR"), ("fl", "GR"), ("fi", "GR"), ("ci", "GR"), ("me", "GR"), ("fm", "GR"), ("de", "DESS"),
    ("re", "EP"), ("se", "SE"), ("h", "SE"),
)

# timing thresholds (ms)
T1_MAX_TR = 1000.0        # spin echo: TR below this with short TE is T1-weighted
T1_TR_BAND = (800.0, 1200.0)  # ...words decide inside this band
T1_MAX_TE = 30.0
PD_MAX_TE = 40.0          # long TR: TE below this is PD (intermediate) weighted
T2_MIN_TE = 60.0          # long TR: TE from this up is T2-weighted
TE_SPLIT = 50.0           # between PD_MAX_TE and T2_MIN_TE without words
GRE_MAX_TR = 100.0        # no spin-echo acquisition repeats this fast: a gradient echo
STIR_MAX_TI = 300.0       # inversion times of STIR (fat nulling) at 1.5-3 T


# ------------------------------------------------------------------ evidence
@dataclass(frozen=True)
class Evidence:
    """What the headers say, normalised once; the rules below read only this."""

    family: str          # "SE", "GR", "EP" or "" (unknown)
    dess_name: bool      # the sequence name is DESS (Siemens *de3d, or a GE name with 'dess')
    ir: bool             # inversion recovery (STIR/TIRM/FLAIR/MPRAGE)
    dim: str             # "2D", "3D" or ""
    fs: bool             # fat suppressed (flags or words; water excitation counts)
    words: frozenset     # description + protocol tokens
    text: str            # description + protocol, lower case, punctuation as spaces
    tr: float | None
    te: float | None
    variant: tuple       # SequenceVariant
    image_type: tuple


def _tokens(text: str) -> set[str]:
    """Lower-case word tokens, with glued contrast words split: 'PDFS' -> pdfs, pd, fs; 'T2W' -> t2w, t2."""
    out = set()
    for t in re.findall(r"[a-z0-9]+", text.lower()):
        out.add(t)
        m = re.fullmatch(r"(t1|t2|pd|dp|iw|im)(w)?(fs|spair|spir|we|tse|fse|se|ffe)?", t)
        if m:
            out.update(x for x in (m.group(1), m.group(1) + (m.group(2) or ""), m.group(3)) if x)
        m = re.fullmatch(r"([a-z]+)[23]d[a-z0-9]*|[23]d([a-z]+)", t)  # GE-style 'efgre3d', '3dfgre'
        if m:
            out.add(m.group(1) or m.group(2))
    return out


def _siemens_family(name: str) -> str:
    n = name.lower().lstrip("*")
    if n.startswith("ep"):
        return "EP"
    for prefix, fam in SIEMENS_PREFIXES:
        if re.match(rf"{prefix}(?:\d|r|b|_)", n):
            return fam
    return ""


def _family(h, words: set, seq_fam: str, seq_words: set, dess_name: bool) -> str:
    """SE, GR or EP from (in order) ScanningSequence, the sequence name, the words, the timings."""
    ss = set(h.scanning_sequence)
    if "EP" in ss:
        return "EP"
    if "SE" in ss:
        return "SE"  # also SE+GR (GRASE): the refocusing pulses set the contrast
    if "GR" in ss:
        return "GR"
    if seq_fam:  # ScanningSequence missing or RM (research mode): Siemens names say what ran
        return {"DESS": "GR", "IR": "SE"}.get(seq_fam, seq_fam)
    if dess_name:
        return "GR"
    for source in (seq_words, words):
        if source & GRE_WORDS and not source & SE_WORDS:
            return "GR"
        if source & SE_WORDS and not source & GRE_WORDS:
            return "SE"
        if source & {"epi", "ep2d", "dwi", "dti"}:
            return "EP"
    # still unknown: the timings. No spin echo repeats faster than GRE_MAX_TR; refocusing flips are >= 90
    if h.tr is not None and h.tr < GRE_MAX_TR:
        return "GR"
    if (h.flip_angle is not None and h.flip_angle >= 90) or (h.tr is not None and h.tr >= T1_MAX_TR):
        return "SE"
    return ""


def _has_phrase(text: str, phrases, whole: bool) -> bool:
    """A phrase starting at a word boundary (``whole``: ending at one too) in normalised ``text``."""
    padded = f" {text} "
    return any((f" {p} " if whole else f" {p}") in padded for p in phrases)


def _fat_words(words: set, text: str) -> bool | None:
    """True/False where the words say fat suppressed / not, None where they say nothing."""
    if words & NO_FAT_WORDS or _has_phrase(text, NO_FAT_PHRASES, whole=True):
        return False
    if words & FAT_WORDS or _has_phrase(text, FAT_PHRASES, whole=False):
        return True
    if "dixon" in words and words & {"w", "water", "wat"}:
        return True
    return None


def _normalised(h) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", f"{h.description} {h.protocol_name}".lower()))


def _evidence(h) -> Evidence:
    text = _normalised(h)
    words = _tokens(text)
    name = (h.sequence_name or "").strip()
    siemens = name.startswith("*") or "SIEMENS" in (h.manufacturer or "").upper()
    seq_fam = _siemens_family(name) if siemens and name else ""
    seq_words = _tokens(name)
    dess_name = seq_fam == "DESS" or bool(DESS_RE.search(name.lower()))
    # an IR flag with SPAIR/SPIR words and no STIR word is the fat-suppression prepulse, not STIR
    fat_prep = bool(words & {"spair", "spir"}) and not words & {"stir", "tirm"}
    ir = ("IR" in h.scanning_sequence and not fat_prep) or seq_fam == "IR" or bool(words & IR_WORDS)
    dim = h.acquisition_type if h.acquisition_type in ("2D", "3D") else ""
    if not dim:  # Siemens names say 2d/3d; so do descriptions like "SAG_3D_DESS"
        dim = "3D" if "3d" in name.lower() or "3d" in words else "2D" if "2d" in name.lower() else ""
    return Evidence(family=_family(h, words, seq_fam, seq_words, dess_name), dess_name=dess_name, ir=ir, dim=dim,
                    fs=_fat_suppressed(h, words, text, ir), words=frozenset(words), text=text, tr=h.tr, te=h.te,
                    variant=tuple(h.sequence_variant), image_type=tuple(h.image_type))


def _fat_suppressed(h, words: set, text: str, ir: bool) -> bool:
    if FAT_FLAGS & set(h.scan_options):
        return True  # the scanner's own flag wins over any description
    said = _fat_words(words, text)
    if said is not None:
        return said
    # STIR nulls fat by inversion
    return ir and (bool(words & {"stir", "tirm"}) or (h.ti is not None and 0 < h.ti <= STIR_MAX_TI))


def fat_suppressed(h: SliceHeader) -> bool:
    """Fat suppressed by a ScanOptions flag (FS, SFS, FAT_SAT, SPIR, SPAIR, WE...), by the words of the
    description/protocol ("fs", "fat sat", "spair", "we", "wats"...), or by a short-TI inversion (STIR).
    Water excitation counts. 'FSE' (fast spin echo) and GE's FAST_GEMS do not."""
    return _evidence(h).fs


# ------------------------------------------------------------------ weighting
def _se_weighting(e: Evidence) -> str | None:
    """'T1', 'T2' or 'PD' of a spin-echo-family series from TR/TE, words breaking ties; None if unknown."""
    says_t1, says_t2, says_pd = bool(e.words & T1_WORDS), bool(e.words & T2_WORDS), bool(e.words & PD_WORDS)
    tr, te = e.tr, e.te
    if tr is None or te is None:  # no timings: the words alone
        if says_pd and not says_t1:
            return "PD"  # "PD" beats "T2" in "PD/T2" dual-echo names: the first echo is the PD one
        if says_t2 and not says_t1:
            return "T2"
        if says_t1 and not (says_t2 or says_pd):
            return "T1"
        return None
    if te < T1_MAX_TE and tr < T1_TR_BAND[1]:
        if tr < T1_TR_BAND[0]:
            return "T1"
        if says_t1 != says_pd:  # inside the band, one word decides
            return "T1" if says_t1 else "PD"
        return "T1" if tr < T1_MAX_TR else "PD"
    if tr < T1_MAX_TR and e.dim != "3D" and not (says_t2 or says_pd):
        return "T1"  # 2-D spin echo at short TR is T1-dominated even at a longer TE; 3-D (SPACE/CUBE) is not
    if te < PD_MAX_TE:
        return "PD"
    if te >= T2_MIN_TE:
        return "T2"
    if says_t2 != says_pd:
        return "T2" if says_t2 else "PD"
    return "T2" if te >= TE_SPLIT else "PD"


def _with_fs(weighting: str | None, fs: bool) -> str | None:
    """T2 -> T2FS and PD -> PDFS when fat suppressed; T1 stays T1 (no T1FS role)."""
    if weighting in ("T2", "PD") and fs:
        return weighting + "FS"
    return weighting


# ------------------------------------------------------------------ rules
def _not_anatomical(e: Evidence) -> bool:
    """EPI/diffusion, parameter maps, localizers: by ScanningSequence/name, ImageType or words."""
    words = DIFFUSION_WORDS | MAP_WORDS | LOCALIZER_WORDS
    return (e.family == "EP" or bool(set(e.image_type) & DERIVED_TYPES) or bool(e.words & words)
            or bool(re.search(r"\b\d+ ?dirs?\b", e.text)))  # "32dir": diffusion directions


def _dess(e: Evidence) -> bool:
    by_words = bool(DESS_RE.search(e.text))
    by_echo_pair = {"SS", "TRSS"} <= set(e.variant)  # a FISP and a PSIF echo in one sequence: DESS
    return e.dess_name or by_echo_pair or (by_words and e.family != "SE")


def _words_only(e: Evidence) -> str | None:
    """Family unknown: gradient-echo words make GRE3D; T1/T2/PD words imply spin-echo weighting."""
    if e.words & GRE_WORDS:
        return "GRE3D" if e.dim != "2D" else "other"
    if e.words & (T1_WORDS | T2_WORDS | PD_WORDS):
        return _with_fs(_se_weighting(e), e.fs)
    return None


# (name, rule): the first rule to return a role decides. Each comment says why it sits where it does.
RULES: tuple[tuple[str, Callable[[Evidence], str | None]], ...] = (
    # diffusion/EPI, parameter maps and localizers are not one anatomical contrast, whatever TR/TE say
    ("not_anatomical", lambda e: "other" if _not_anatomical(e) else None),
    # inversion recovery (STIR/TIRM/FLAIR/MPRAGE): the inversion sets the contrast, not TR/TE
    ("inversion_recovery", lambda e: "other" if e.ir else None),
    # DESS before other gradient echoes: its timings are a spoiled GRE's, only its name/echo pair tell
    ("dess", lambda e: "DESS" if _dess(e) else None),
    # any other gradient echo acquired in 3-D (or of unknown dimension): FLASH/SPGR/FFE/VIBE/MEDIC/THRIVE
    ("gradient_echo_3d", lambda e: "GRE3D" if e.family == "GR" and e.dim != "2D" else None),
    # 2-D gradient echo (T2*, 2-D MEDIC/MERGE): not a volume contrast this project uses
    ("gradient_echo_2d", lambda e: "other" if e.family == "GR" else None),
    # spin echo (2-D or 3-D SPACE/CUBE/VISTA): weighting from TR/TE, then fat suppression
    ("spin_echo", lambda e: _with_fs(_se_weighting(e), e.fs) if e.family == "SE" else None),
    # family unknown (anonymised/converted headers, research mode): the words, timings breaking their ties
    ("words_only", lambda e: _words_only(e) if e.family == "" else None),
)


def explain(h: SliceHeader) -> tuple[str, str]:
    """(role, name of the rule that decided it); ``("other", "no_rule")`` when none did."""
    e = _evidence(h)
    for name, rule in RULES:
        role = rule(e)
        if role is not None:
            return role, name
    return "other", "no_rule"


def contrast_role(h: SliceHeader) -> str:
    """The contrast role of the series whose header is ``h``: one of :data:`ROLES`."""
    return explain(h)[0]
