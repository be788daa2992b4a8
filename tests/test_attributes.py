import pytest

from kamal_attr import KamalError
from kamal_attr.attributes import (CELEBA_ATTRIBUTES, GROUPS, SOURCE_NETS, check_attribute,
                                   check_group, group_of, source_net, source_nets_of)


def test_forty_unique_attributes_in_file_order():
    assert len(CELEBA_ATTRIBUTES) == 40 == len(set(CELEBA_ATTRIBUTES))
    assert CELEBA_ATTRIBUTES[0] == "5_o_Clock_Shadow" and CELEBA_ATTRIBUTES[-1] == "Young"


def test_registry_matches_method_table():
    assert len(SOURCE_NETS) == 22
    assert GROUPS == {"hair": ("Black_Hair", "Blond_Hair", "Brown_Hair", "Bangs"),
                      "eye": ("Bags_Under_Eyes", "Bushy_Eyebrows", "Narrow_Eyes"),
                      "face": ("Oval_Face", "Young", "Heavy_Makeup")}
    assert sum(len(c) for c in GROUPS.values()) == 10
    for spec in SOURCE_NETS:
        assert all(a in CELEBA_ATTRIBUTES for a in spec.attributes)
        assert spec.component in GROUPS[spec.group]
    for group in GROUPS:  # ids count from 1 inside each group, without gaps
        assert [s.source_id for s in source_nets_of(group)] == list(range(1, len(source_nets_of(group)) + 1))
    assert [s.source_id for s in source_nets_of("hair", "Brown_Hair")] == [5, 6, 7]
    assert source_net("Young", 4).attributes == ("Young", "Gray_Hair", "Receding_Hairline", "Goatee")


def test_misspelt_names_fail_with_the_valid_ones():
    with pytest.raises(KamalError, match=r"Did you mean 'Eyeglasses'.*Valid: 5_o_Clock_Shadow"):
        check_attribute("Eyeglases")
    with pytest.raises(KamalError, match="hair, eye, face"):
        check_group("hairs")
    with pytest.raises(KamalError, match=r"source ids are \[1, 2\]"):
        source_net("Black_Hair", 3)
    with pytest.raises(KamalError, match="no component attribute"):
        group_of("Male")
