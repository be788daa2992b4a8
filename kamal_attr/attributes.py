"""The attribute registry: CelebA's 40 attributes, the three groups and the 22 source nets.

Everything that names an attribute goes through :func:`check_attribute`, so a misspelt name
fails early with the list of valid ones instead of deep inside training.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass

from . import KamalError

#: The 40 CelebA attributes in the column order of ``list_attr_celeba.txt``.
CELEBA_ATTRIBUTES: tuple[str, ...] = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs",
    "Big_Lips", "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair",
    "Bushy_Eyebrows", "Chubby", "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair",
    "Heavy_Makeup", "High_Cheekbones", "Male", "Mouth_Slightly_Open", "Mustache",
    "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline",
    "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings",
    "Wearing_Hat", "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young",
)


@dataclass(frozen=True)
class SourceNetSpec:
    """One published teacher of METHOD.md's table.

    ``attributes[0]`` is the component task it serves; the others make it multi-task.
    """

    group: str
    source_id: int
    attributes: tuple[str, ...]
    label: str = ""  # names a net outside the table (``train_sourcenet.py --attributes``)

    @property
    def component(self) -> str:
        return self.attributes[0]

    @property
    def name(self) -> str:
        return self.label or f"source{self.source_id}_{self.component}"


def _spec(group: str, source_id: int, *attributes: str) -> SourceNetSpec:
    return SourceNetSpec(group, source_id, attributes)


#: The 22 source nets of the paper's CelebA experiment (ids count from 1 inside a group).
SOURCE_NETS: tuple[SourceNetSpec, ...] = (
    _spec("hair", 1, "Black_Hair", "Arched_Eyebrows", "Attractive", "Big_Lips"),
    _spec("hair", 2, "Black_Hair", "Bags_Under_Eyes", "Blurry"),
    _spec("hair", 3, "Blond_Hair", "Pale_Skin", "Receding_Hairline"),
    _spec("hair", 4, "Blond_Hair", "High_Cheekbones"),
    _spec("hair", 5, "Brown_Hair", "Double_Chin"),
    _spec("hair", 6, "Brown_Hair", "Oval_Face", "Bushy_Eyebrows"),
    _spec("hair", 7, "Brown_Hair", "Narrow_Eyes", "Chubby"),
    _spec("hair", 8, "Bangs", "Attractive", "Receding_Hairline", "Big_Nose"),
    _spec("hair", 9, "Bangs", "Blurry", "Pale_Skin"),
    _spec("eye", 1, "Bags_Under_Eyes", "Rosy_Cheeks", "Oval_Face", "Smiling"),
    _spec("eye", 2, "Bags_Under_Eyes", "Heavy_Makeup"),
    _spec("eye", 3, "Bushy_Eyebrows", "Big_Lips", "Pale_Skin"),
    _spec("eye", 4, "Bushy_Eyebrows", "Young"),
    _spec("eye", 5, "Bushy_Eyebrows", "Heavy_Makeup", "Wearing_Necklace"),
    _spec("eye", 6, "Narrow_Eyes", "Wearing_Lipstick"),
    _spec("eye", 7, "Narrow_Eyes", "Mouth_Slightly_Open", "Wearing_Necktie"),
    _spec("face", 1, "Oval_Face", "Male"),
    _spec("face", 2, "Oval_Face", "Big_Lips", "Pointy_Nose"),
    _spec("face", 3, "Young", "Wearing_Lipstick"),
    _spec("face", 4, "Young", "Gray_Hair", "Receding_Hairline", "Goatee"),
    _spec("face", 5, "Heavy_Makeup", "Male"),
    _spec("face", 6, "Heavy_Makeup", "Sideburns", "Double_Chin", "Attractive"),
)

#: Group name -> its component attributes, in head order of the target net.
GROUPS: dict[str, tuple[str, ...]] = {}
for _s in SOURCE_NETS:
    if _s.component not in GROUPS.setdefault(_s.group, ()):
        GROUPS[_s.group] += (_s.component,)
del _s


def _unknown(kind: str, name: str, valid: tuple[str, ...] | list[str]) -> KamalError:
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return KamalError(f"unknown {kind} {name!r}.{hint} Valid: {', '.join(valid)}")


def check_attribute(name: str) -> str:
    """Return ``name`` if it is a CelebA attribute, else raise listing the valid names."""
    if name not in CELEBA_ATTRIBUTES:
        raise _unknown("attribute", name, CELEBA_ATTRIBUTES)
    return name


def check_group(group: str) -> str:
    if group not in GROUPS:
        raise _unknown("group", group, tuple(GROUPS))
    return group


def source_nets_of(group: str, component: str | None = None) -> tuple[SourceNetSpec, ...]:
    """The source nets of ``group`` (optionally only those serving ``component``), by id."""
    check_group(group)
    return tuple(s for s in SOURCE_NETS
                 if s.group == group and (component is None or s.component == component))


def group_of(component: str) -> str:
    """The group whose component attribute ``component`` is."""
    check_attribute(component)
    for group, components in GROUPS.items():
        if component in components:
            return group
    components = [c for cs in GROUPS.values() for c in cs]
    raise KamalError(f"{component!r} is no component attribute of any group; "
                     f"choose one of: {', '.join(components)}")


def source_net(component: str, source_id: int) -> SourceNetSpec:
    """Look up a source net by the seed's ``--target_attribute`` and ``--source_id``."""
    group = group_of(component)
    for spec in source_nets_of(group, component):
        if spec.source_id == source_id:
            return spec
    ids = [s.source_id for s in source_nets_of(group, component)]
    raise KamalError(f"no source net {source_id} for {component} (group {group}); "
                     f"its source ids are {ids}")
