"""``resolve(cfg)``: check a composed config and build the run's typed plan, once.

The strategies factory (through the ServerApp) and the dry run read the plan instead of
re-deriving settings from ``cfg``; ``summary.json`` and the model card, which start from
a run's config, state the same guarantee through
:func:`~fl_app.config.guarantee.guarantee_of` (docs/architecture.md, Configuration):

1. :func:`~fl_app.config.validate.validate_config`: each value and each cross-field
   rule (typed errors naming the field and the fix);
2. the guarantee the run gives (:class:`~fl_app.config.guarantee.Guarantee`);
3. the client-level DP settings (:class:`~fl_app.config.client_dp.ClientDpSettings`):
   calibration of ``z`` from a target ε, the model's parameter count, the
   secure-aggregation cohort gate and the distributed-DP ring, each failing as a
   :class:`~fl_app.config.errors.ConfigPlanError` naming its field;
4. the secure-aggregation settings (:class:`~fl_app.secagg.settings.SecAggSettings`,
   ``None`` with ``secagg.mode=off``) the server's round driver runs with;
5. the round driver's sampling and cohort sizes (:class:`~fl_app.config.driver_plan.DriverPlan`).

The run directory's layout (:class:`fl_app.server.layout.RunLayout`) is not in the plan:
it needs the run directory, which only the process that runs the experiment knows (a
resumed run's is ``resume``; a Hydra job's is made after the plan is checked).

Each process resolves a run once and hands the plan down: ``fl-app simulate``'s
preflight plan goes to its Hydra job, :func:`fl_app.runtime.simulation.run_simulation_experiment`
and the ServerApp it runs in the same process (Ray runs only the clients elsewhere); a
deployed ServerApp composes and resolves its own. A plan is derived data: the config is
what travels between processes and is hashed.
"""

from __future__ import annotations

from dataclasses import dataclass

from fl_app.config.client_dp import ClientDpSettings
from fl_app.config.driver_plan import DriverPlan, driver_plan
from fl_app.config.errors import ConfigError, ConfigPlanError
from fl_app.config.guarantee import Guarantee, guarantee_of
from fl_app.config.schema import AppConfig, PrivacyMode
from fl_app.config.validate import validate_config
from fl_app.secagg.settings import SecAggSettings

__all__ = ["RunPlan", "resolve"]


@dataclass(frozen=True)
class RunPlan:
    """A checked config and what it resolves to.

    ``client_dp`` is ``None`` without client-level DP (``privacy.mode=none``);
    ``guarantee`` is what the run promises, as the summary, card and dry run state it;
    ``secagg`` is ``None`` with ``secagg.mode=off``; ``driver`` is who each round
    samples and how many.
    """

    cfg: AppConfig
    client_dp: ClientDpSettings | None
    guarantee: Guarantee
    secagg: SecAggSettings | None
    driver: DriverPlan


def resolve(cfg: AppConfig) -> RunPlan:
    """Check ``cfg`` and build its plan; raise a :class:`ConfigError` naming the field."""
    validate_config(cfg)
    return RunPlan(
        cfg=cfg,
        client_dp=_client_dp(cfg),
        guarantee=guarantee_of(cfg),
        secagg=_secagg(cfg),
        driver=driver_plan(cfg),
    )


def _secagg(cfg: AppConfig) -> SecAggSettings | None:
    try:
        return SecAggSettings.from_config(cfg.secagg, cfg.dataset.num_partitions)
    except ValueError as err:
        # validate_config checks each of these fields first; a refusal here is a
        # combination the settings object alone knows (its message names the fix).
        raise ConfigPlanError("secagg", cfg.secagg.mode.value, str(err)) from err


def _client_dp(cfg: AppConfig) -> ClientDpSettings | None:
    if cfg.privacy.mode is PrivacyMode.none:
        return None
    from fl_app.privacy.ddg_encoding import DdpConfigError
    from fl_app.privacy.history import AccountingError

    try:
        return ClientDpSettings.from_config(cfg)
    except ConfigError:
        raise
    except DdpConfigError as err:
        # The ring cannot hold the noised sum at this width (its message names the fix).
        raise ConfigPlanError("secagg.bits", cfg.secagg.bits, str(err)) from err
    except (ValueError, AccountingError) as err:
        # An accountant or event refusing the resolved parameters.
        raise ConfigPlanError("privacy", cfg.privacy.mode.value, str(err)) from err
