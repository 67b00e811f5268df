"""Wiring: a drafter chosen by name through the plugin host and bound to the plan's target, and a
stepper whose feature mirror is allocated through the plan's ``kv_storage``."""
from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

from luce_core.contract.drafting import Drafter, DrafterOptions, Target
from luce_core.contract.roles import optional
from luce_core.session import Session
from luce_core.speculative.stepper import SpeculativeStepper

if TYPE_CHECKING:
    from luce_core.feature_mirror import FeatureMirror
    from luce_core.plan import Plan


def make_drafter(name: str, plan: "Plan", options: DrafterOptions | None = None) -> Drafter:
    """Select the drafter ``name`` (forced, so an unknown or unrunnable one is an error with its
    reasons), build it and bind it to the plan's target model."""
    from luce_core import plugin_host, selection

    config = attrs.evolve(plan.config, overrides={**plan.config.overrides, "drafter": name})
    impl = selection.select("drafter", plugin_host.host().impls("drafter"), plan.caps, config)
    drafter = impl.create(plan.caps, config)
    drafter.bind(Target(plan.model, plan.loaded.tokenizer, plan.ctx, plan), options or DrafterOptions())
    return drafter


def feature_mirror(plan: "Plan", drafter: Drafter) -> "FeatureMirror | None":
    """The mirror of the target features ``drafter`` reads (None when it reads none): a store of
    the plan's kv_storage on the target's device, in the configured feature dtype."""
    capture = optional(drafter, "drafter", "capture")
    if not capture:
        return None
    from luce_core.feature_mirror import FeatureMirror

    storage = plan.chosen["kv_storage"].create(plan.caps, plan.config)
    return FeatureMirror(storage, plan.ctx, len(capture) * plan.model.cfg.hidden, plan.config.feature_dtype,
                         plan.model.device)


def stepper_for(plan: "Plan", session: Session, drafter: Drafter, *, budget: int, tree: bool = False,
                static_shapes: bool | None = None, options: DrafterOptions | None = None) -> SpeculativeStepper:
    """A speculative stepper over ``session`` (of ``plan``'s model) with ``drafter`` and, when the
    drafter reads target features, a mirror from :func:`feature_mirror`."""
    return SpeculativeStepper(session, drafter, budget=budget, tree=tree, static_shapes=static_shapes,
                              mirror=feature_mirror(plan, drafter), options=options)
