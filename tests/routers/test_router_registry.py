"""The router registry: registration, building by name, and internal routers kept out of the user's choices."""

import pytest

from moe.compress import MergedRouter, SkippingRouter
from moe.model import ModelConfig
from moe.routers import (
    INTERNAL_ROUTERS,
    ROUTERS,
    BASERouter,
    ExpertChoiceRouter,
    HashRouter,
    NullExpertRouter,
    ReLURouter,
    Router,
    SinkhornRouter,
    TopKRouter,
    TopPRouter,
    build_router,
    register_router,
    router_name,
    router_names,
)
from moe.train.config import RouterSchema

BUILT_IN = {
    "topk": TopKRouter,
    "expert_choice": ExpertChoiceRouter,
    "relu": ReLURouter,
    "base": BASERouter,
    "sinkhorn": SinkhornRouter,
    "hash": HashRouter,
    "top_p": TopPRouter,
    "null_experts": NullExpertRouter,
}


def test_built_in_routers_are_choices_and_compression_wrappers_are_internal():
    assert {name: ROUTERS[name] for name in BUILT_IN} == BUILT_IN
    assert (ROUTERS["merged"], ROUTERS["skipping"]) == (MergedRouter, SkippingRouter)
    assert {"merged", "skipping"} <= INTERNAL_ROUTERS
    assert router_names() == sorted(BUILT_IN)


def test_internal_router_is_buildable_by_name_and_reports_its_name():
    merged = build_router("merged", 8, 3, source_experts=6, top_k=2)
    assert isinstance(merged, MergedRouter) and merged.source.num_experts == 6
    assert router_name(merged) == "merged" and router_name(merged.source) == "topk"
    skipping = build_router("skipping", 8, 4, top_k=2)
    assert isinstance(skipping, SkippingRouter) and router_name(skipping) == "skipping"


def test_unknown_names_list_only_the_choices():
    for error_site in (
        lambda: build_router("nope", 8, 4),
        lambda: ModelConfig(router="nope"),
        lambda: RouterSchema(name="nope"),
    ):
        with pytest.raises(ValueError, match="'nope'.*'topk'") as error:
            error_site()
        assert "merged" not in str(error.value) and "skipping" not in str(error.value)


def test_configs_accept_internal_names_so_compressed_checkpoints_load():
    assert RouterSchema(name="merged", kwargs={"source_experts": 8}).name == "merged"
    assert ModelConfig(router="merged", router_kwargs={"source_experts": 8}).router == "merged"


def test_register_router_adds_a_name_and_refuses_a_taken_one():
    class Echo(TopKRouter):
        pass

    try:
        assert register_router("echo_test", internal=True)(Echo) is Echo
        assert isinstance(build_router("echo_test", 8, 4), Echo) and "echo_test" not in router_names()
        assert register_router("echo_test", internal=True)(Echo) is Echo  # the same class again is a no-op
    finally:
        ROUTERS.pop("echo_test", None)
        INTERNAL_ROUTERS.discard("echo_test")

    with pytest.raises(ValueError, match="router name 'topk' is already registered to TopKRouter"):
        register_router("topk")(type("Other", (Router,), {}))
    assert ROUTERS["topk"] is TopKRouter
