"""A site's data-use policy: what its ClientApp may release, checked before it trains.

An institution states, in a file of its own (``--node-config "policy-path=/path"``),
what may leave its machine whatever the server asks. The ClientApp reads it for every
train and evaluate instruction and refuses, *before* it loads data or trains, an
instruction the policy does not allow; the refusal names the policy field and goes
back to the server as a structured error (:class:`fl_app.client.refusal.ClientRefusal`),
and into the site's own audit log (``client.refused``).

Policy file (YAML or JSON; every field optional, unknown keys refused)::

    allowed_artifacts: [masked_update, evaluation_metrics]  # default: all of ARTIFACTS
    max_epsilon: 8.0                  # ε this site accounts itself, after this round
    require_secure_aggregation: true  # train only as secure-aggregation stage 3
    require_record_level_dp: true     # train only with DP-SGD (spec.dpsgd)
    # Secure aggregation: what the server's parameters may be at weakest (defaults shown).
    secagg_max_dropout_tolerance: 0.5 # fewer survivors than ceil((1 - this) * cohort): refuse
    secagg_min_corrupt_fraction: 0.1  # thresholds derived for fewer colluders: refuse
    secagg_min_corrupt_clients: 1     # ... and never fewer than this many colluders
    secagg_min_cohort_size: 3         # smaller cohorts refused
    secagg_min_security_bits: 40      # sparse graph's security failure <= 2^-bits
    secagg_min_correctness_bits: 20
    secagg_allow_custom_params: false # hand-picked (k, t), no probabilistic guarantee
    secagg_min_server_model: honest_but_curious  # or malicious: refuse rounds whose
                                      # thresholds assume a server following the protocol
    ddp_min_noise_multiplier: 0.25    # distributed DP: z of the unmasked sum (null: no floor)
    local_min_noise_multiplier: 1.0   # local DP: z of this site's own noise (null: no floor)
    allow_seeded_noise: false         # DP-SGD with noise/batches seeded by the server's spec
    allowed_share_artifacts: [delta]  # share.artifact the site sends (default: delta, weights,
                                      # compressed)
    shareable_layers: ["features.*"]  # share.layers may name only parameters these globs
                                      # cover (default ["*"]); the rest must stay at the site

The ``secagg_*`` and ``ddp_*`` fields are the site's own safety parameters for secure
aggregation (docs/architecture.md, Rules: "clients decide their own safety parameters"): they
apply with safe defaults even without a policy file, and a round whose parameters
are weaker is refused at stage 2 or 3 (:mod:`fl_app.secagg.client`) with the field
named. The server chooses the parameters; the client only checks that they are at
least as strong as its floor, and counts survivors itself against that floor.

Why these defaults. ``floor(0.1 * n)`` colluders is 0 below 10 clients, and thresholds
that assume no colluder let one sybil next to a split view of who dropped reveal an
input: ``secagg_min_corrupt_clients: 1`` always assumes one. No threshold helps against
a cohort that is mostly the server's own sybils ([target, sybil, sybil] reveals the
target as sum minus the sybils' inputs): ``secagg_min_cohort_size`` (default 3, the
protocol's minimum, so small simulations run) is the knob a site raises to make that
cost the server more real-looking clients. ``ddp_min_noise_multiplier: 0.25`` keeps a
server from switching distributed DP's noise off (a share_std of 1e-12 was accepted
when the floor was unset); it is a floor against that, not a budget (``max_epsilon``
and the server's accountant are), and a site should set the z it actually wants.
``secagg_min_server_model: honest_but_curious`` accepts both server models (the run's
``secagg.server_model`` decides); a site that does not trust the coordinator to follow
the protocol sets ``malicious`` and then refuses, at stage 2 before it shares anything,
a round whose thresholds were derived for an honest-but-curious server (they do not
survive a split view of who dropped). A site whose node config names a signing key or
roster (``signing-key-path`` / ``roster-path``) was set up for an untrusted server: unless
its policy names ``secagg_min_server_model`` explicitly, its minimum is ``malicious`` (a
server cannot downgrade it to the cheaper model). The default is the one the project's default run
uses (README, threat table): the cheaper thresholds, under the documented assumption.

``max_epsilon`` bounds the ε the client accounts itself: record-level DP-SGD's
(``dp-epsilon``, its persistent accountant) and local DP's (``dp-local-epsilon``),
each projected to the end of the round before any training. A train instruction
under which the client accounts no ε (no DP-SGD, no local DP: a plain update, or
central DP whose noise the server adds) is refused: the site cannot bound what it
cannot account. Trust assumption: the site trusts its own ClientApp code and this
file, not the server; the check is only as strong as the client's accounting.

Pure and torch-free: the key-exchange stages of secure aggregation import nothing
heavy, and this module only compares. The file is read and checked by
:mod:`fl_app.client.policy_file`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from fl_app.share_layers import not_covered

__all__ = [
    "ARTIFACTS",
    "POLICY_FIELDS",
    "SHARE_ARTIFACTS",
    "PolicyError",
    "PolicyViolation",
    "SitePolicy",
    "released_artifact",
]

#: What can leave a client, by message: a train reply's update (raw, clipped,
#: clipped+noised, or masked under secure aggregation) or an evaluate reply's metrics.
ARTIFACTS = ("update", "clipped_update", "noised_update", "masked_update", "evaluation_metrics")

POLICY_FIELDS = (
    "allowed_artifacts",
    "max_epsilon",
    "require_secure_aggregation",
    "require_record_level_dp",
    "secagg_max_dropout_tolerance",
    "secagg_min_corrupt_fraction",
    "secagg_min_corrupt_clients",
    "secagg_min_cohort_size",
    "secagg_min_security_bits",
    "secagg_min_correctness_bits",
    "secagg_allow_custom_params",
    "secagg_min_server_model",
    "ddp_min_noise_multiplier",
    "local_min_noise_multiplier",
    "allow_seeded_noise",
    "allowed_share_artifacts",
    "shareable_layers",
)

#: What ``share.artifact`` may declare (fl_app.config.schema.ShareArtifact's values).
SHARE_ARTIFACTS = ("delta", "weights", "compressed")

#: Safe defaults of the secure-aggregation floor (the project's own defaults pass).
DEFAULT_MAX_DROPOUT_TOLERANCE = 0.5
DEFAULT_MIN_CORRUPT_FRACTION = 0.1
DEFAULT_MIN_SECURITY_BITS = 40
DEFAULT_MIN_CORRECTNESS_BITS = 20
DEFAULT_MIN_CORRUPT_CLIENTS = 1
DEFAULT_MIN_COHORT_SIZE = 3
#: Server models, weakest assumption last: a site accepts its minimum and stronger ones.
SERVER_MODELS = ("honest_but_curious", "malicious")
DEFAULT_MIN_SERVER_MODEL = "honest_but_curious"
#: Distributed DP's z floor without a policy file: against a server that turns noise off.
DEFAULT_DDP_MIN_NOISE_MULTIPLIER = 0.25
#: Local DP's z floor without a policy file: a server sending z = 0.05 would buy a
#: release of epsilon ~ 970 (no privacy) from a site that set no max_epsilon. At z = 1 one
#: release already costs epsilon ~ 5 at delta = 1e-5: below it local DP protects nothing.
DEFAULT_LOCAL_MIN_NOISE_MULTIPLIER = 1.0


class PolicyError(ValueError):
    """The policy file cannot be used (unreadable, unknown key, wrong type)."""


class PolicyViolation(Exception):
    """An instruction the policy does not allow; ``field`` names the policy field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"site policy `{field}`: {message}")
        self.field = field
        self.message = message


def released_artifact(
    message_type: str, *, secure: bool, client_clips: bool, local_noise: bool
) -> str:
    """The artifact a reply to this instruction releases (one of :data:`ARTIFACTS`)."""
    if message_type == "evaluate":
        return "evaluation_metrics"
    if message_type != "train":
        raise ValueError(f"message_type is {message_type!r}; expected 'train' or 'evaluate'")
    if secure:
        return "masked_update"
    if local_noise:
        return "noised_update"
    if client_clips:
        return "clipped_update"
    return "update"


@dataclass(frozen=True)
class SitePolicy:
    """A parsed policy (see the module docstring). The defaults allow every artifact and
    keep the secure-aggregation and distributed-DP floor at its safe values."""

    allowed_artifacts: frozenset[str] = frozenset(ARTIFACTS)
    max_epsilon: float | None = None
    require_secure_aggregation: bool = False
    require_record_level_dp: bool = False
    secagg_max_dropout_tolerance: float = DEFAULT_MAX_DROPOUT_TOLERANCE
    secagg_min_corrupt_fraction: float = DEFAULT_MIN_CORRUPT_FRACTION
    secagg_min_corrupt_clients: int = DEFAULT_MIN_CORRUPT_CLIENTS
    secagg_min_cohort_size: int = DEFAULT_MIN_COHORT_SIZE
    secagg_min_security_bits: int = DEFAULT_MIN_SECURITY_BITS
    secagg_min_correctness_bits: int = DEFAULT_MIN_CORRECTNESS_BITS
    secagg_allow_custom_params: bool = False
    secagg_min_server_model: str = DEFAULT_MIN_SERVER_MODEL
    # Whether the policy file named secagg_min_server_model: a site with a signing key or
    # roster and no explicit choice accepts only malicious rounds (fl_app.secagg.client).
    secagg_min_server_model_explicit: bool = False
    # Whether the policy file named require_secure_aggregation: a site with a signing key
    # or roster and no explicit choice trains only under secure aggregation and does not
    # evaluate (fl_app.secagg.client.effective_policy). Not compared: it records where the
    # value came from, not what the policy allows.
    require_secure_aggregation_explicit: bool = field(default=False, compare=False)
    ddp_min_noise_multiplier: float | None = DEFAULT_DDP_MIN_NOISE_MULTIPLIER
    local_min_noise_multiplier: float | None = DEFAULT_LOCAL_MIN_NOISE_MULTIPLIER
    # DP-SGD's noise and batches seeded from the run's seed, round and partition (the
    # server's privacy.secure_mode=false) can be regenerated by the server: a site with
    # a policy refuses that unless it opts in for a reproducible experiment.
    allow_seeded_noise: bool = False
    # What a train reply may be (share.artifact) and which parameters may leave the site
    # (fnmatch globs over state_dict names): fl_app.client.personal checks both before
    # training.
    allowed_share_artifacts: frozenset[str] = frozenset(SHARE_ARTIFACTS)
    shareable_layers: tuple[str, ...] = ("*",)

    def check_local_noise(self, noise_multiplier: float) -> None:
        """Raise :class:`PolicyViolation` if local DP's ``z`` (set by the server's
        instruction) is below ``local_min_noise_multiplier`` (1.0 by default; a policy's
        explicit null: no floor). The client adds the noise, so it decides how little."""
        floor = self.local_min_noise_multiplier
        if floor is not None and not noise_multiplier >= floor:
            raise PolicyViolation(
                "local_min_noise_multiplier",
                f"local DP noise multiplier {noise_multiplier:g} is below the site's floor "
                f"{floor:g}; run with privacy.noise_multiplier >= {floor:g}",
            )

    def survivor_floor(self, cohort_size: int) -> int:
        """The fewest survivors this site unmasks for in a cohort of ``cohort_size``.

        ``ceil((1 - secagg_max_dropout_tolerance) * n)``, and never below 2 (a sum of
        one input is that input).
        """
        n = int(cohort_size)
        return max(2, math.ceil((1.0 - self.secagg_max_dropout_tolerance) * n - 1e-9))

    def check_secagg_params(self, params: Any) -> None:
        """Raise :class:`PolicyViolation` if ``params`` are weaker than this site allows.

        ``params`` is a :class:`fl_app.secagg.params.SecAggParams` already re-derived by
        the client (so ``(k, t)`` match the fractions and bits it states). Custom
        parameters (``security_bits = correctness_bits = 0``) need
        ``secagg_allow_custom_params``. Wherever the bound is deterministic (custom
        parameters, the complete graph) ``2t > k + 1 + min(C, k)`` is checked exactly: a
        server that tells some honest holders of a node "it survived" (self-mask shares)
        and the others "it dropped" (key shares) gets both secrets iff the ``k + 1 - Y``
        honest holders plus the ``Y`` corrupt ones, who answer both, fill two piles of
        ``t``: ``2(t - Y) <= k + 1 - Y``, i.e. ``2t <= k + 1 + Y``
        (:mod:`fl_app.secagg.derive`; derived sparse parameters bound ``Y`` with
        probability ``1 - 2^-security_bits``, re-derived by the client). That bound is
        the ``malicious`` server model's; parameters for an ``honest_but_curious``
        server need only ``2t > k + 1`` and ``t > C`` and are refused outright when
        ``secagg_min_server_model`` is ``malicious``.
        """
        n, k = params.num_clients, params.degree
        model = getattr(params.server_model, "value", params.server_model)
        if SERVER_MODELS.index(model) < SERVER_MODELS.index(self.secagg_min_server_model):
            raise PolicyViolation(
                "secagg_min_server_model",
                f"the round's thresholds assume a {model} server; the site requires "
                f"{self.secagg_min_server_model} (run with "
                f"secagg.server_model={self.secagg_min_server_model})",
            )
        malicious = model == "malicious"
        y = min(params.max_corrupt, k) if malicious else 0
        if n < self.secagg_min_cohort_size:
            raise PolicyViolation(
                "secagg_min_cohort_size",
                f"the round's cohort has {n} clients; the site takes part in cohorts of at "
                f"least {self.secagg_min_cohort_size} (a server's own sybils make up a small "
                "cohort cheaply, and sum minus their inputs is the site's input)",
            )
        self._check_thresholds(params, malicious, y)
        self._check_colluders_and_dropouts(params)

    def _check_thresholds(self, params: Any, malicious: bool, y: int) -> None:
        """``(k, t)`` against a split view and the colluders; custom or derived bits."""
        k, t = params.degree, params.threshold
        custom = params.security_bits == 0 and params.correctness_bits == 0
        if (custom or params.is_complete) and not 2 * t > k + 1 + y:
            field = "secagg_allow_custom_params" if custom else "secagg_min_corrupt_clients"
            raise PolicyViolation(
                field,
                f"threshold t={t} with degree k={k} and C={params.max_corrupt} colluders: "
                f"2t={2 * t} <= k+1+C={k + 1 + y}, so a split view "
                "of who dropped plus the colluders reveals both secrets of a node"
                if malicious
                else f"threshold t={t} with degree k={k}: 2t={2 * t} <= k+1={k + 1}, so two "
                "disjoint sets of holders reveal both secrets of a node",
            )
        if (custom or params.is_complete) and not t > params.max_corrupt:
            raise PolicyViolation(
                "secagg_min_corrupt_clients",
                f"threshold t={t} does not exceed the C={params.max_corrupt} colluders: "
                "their own shares rebuild a node's secrets",
            )
        if custom:
            if not self.secagg_allow_custom_params:
                raise PolicyViolation(
                    "secagg_allow_custom_params",
                    f"the server sent hand-picked parameters (k={k}, t={t}) with no "
                    "probabilistic guarantee; the site accepts only derived ones",
                )
            if not 2 * t > k + 1:
                raise PolicyViolation(
                    "secagg_allow_custom_params",
                    f"custom threshold t={t} with degree k={k}: 2t={2 * t} <= k+1={k + 1} "
                    "lets two disjoint sets of honest holders reveal both secrets of a node",
                )
        else:
            if params.security_bits < self.secagg_min_security_bits:
                raise PolicyViolation(
                    "secagg_min_security_bits",
                    f"security_bits={params.security_bits} is below the site's "
                    f"{self.secagg_min_security_bits}",
                )
            if params.correctness_bits < self.secagg_min_correctness_bits:
                raise PolicyViolation(
                    "secagg_min_correctness_bits",
                    f"correctness_bits={params.correctness_bits} is below the site's "
                    f"{self.secagg_min_correctness_bits}",
                )

    def _check_colluders_and_dropouts(self, params: Any) -> None:
        """The dropouts the round tolerates and the colluders its thresholds assume."""
        n = params.num_clients
        if params.max_dropouts / n > self.secagg_max_dropout_tolerance + 1e-12:
            raise PolicyViolation(
                "secagg_max_dropout_tolerance",
                f"the round tolerates {params.max_dropouts} of {n} dropouts (a sum of "
                f"{params.min_survivors}); the site allows at most "
                f"{self.secagg_max_dropout_tolerance:g} of the cohort",
            )
        # What the thresholds rest on is the count C, not the fraction stated.
        if params.max_corrupt < math.floor(self.secagg_min_corrupt_fraction * n + 1e-12):
            raise PolicyViolation(
                "secagg_min_corrupt_fraction",
                f"the round's thresholds assume {params.max_corrupt} of {n} clients collude "
                f"with the server; the site requires at least "
                f"floor({self.secagg_min_corrupt_fraction:g} * {n})",
            )
        if params.max_corrupt < self.secagg_min_corrupt_clients:
            raise PolicyViolation(
                "secagg_min_corrupt_clients",
                f"the round's thresholds assume {params.max_corrupt} of {n} clients collude "
                f"with the server; the site requires at least {self.secagg_min_corrupt_clients} "
                "(whatever the fraction rounds down to in a small cohort)",
            )

    def check_ddp(
        self,
        *,
        cohort: int,
        min_survivors: int,
        share_std: float,
        bound: float,
        colluders: int = 0,
    ) -> None:
        """Raise :class:`PolicyViolation` if a distributed-DP round's noise is too weak.

        ``min_survivors`` (``n_min``) is the number of noise shares the server says make
        up the target noise: it must reach :meth:`survivor_floor`. The sum's noise
        multiplier is ``share_std·√n_min / bound`` (``bound`` is the L2 sensitivity the
        client's own conditional rounding enforces); it must reach
        ``ddp_min_noise_multiplier`` (0.25 by default; a policy's explicit null: no floor).
        ``colluders`` (``C``, malicious server model): survivors whose noise shares the
        server knows, so the floor counts ``share_std·√(n_min − C)/bound``, the noise it
        cannot remove (``n_min <= C``: none, refused).
        """
        floor = self.survivor_floor(cohort)
        if min_survivors < floor:
            raise PolicyViolation(
                "secagg_max_dropout_tolerance",
                f"distributed DP calibrated for {min_survivors} of {cohort} survivors; "
                f"the site's noise share assumes at least {floor}",
            )
        honest = min_survivors - max(0, int(colluders))
        z = share_std * math.sqrt(max(0, honest)) / bound
        if self.ddp_min_noise_multiplier is not None and (
            honest < 1 or z < self.ddp_min_noise_multiplier
        ):
            raise PolicyViolation(
                "ddp_min_noise_multiplier",
                f"the round's noise multiplier is {z:.4g}"
                + (
                    f" from the {honest} noise shares beyond C={colluders} colluders"
                    if colluders
                    else ""
                )
                + f", below the site's {self.ddp_min_noise_multiplier:g}",
            )

    def check_request(
        self,
        message_type: str,
        *,
        artifact: str,
        secure: bool,
        record_level_dp: bool,
        accounts_epsilon: bool,
    ) -> None:
        """Raise :class:`PolicyViolation` unless this instruction may run at all.

        ``accounts_epsilon``: the client accounts an ε for this round (DP-SGD or local DP).
        """
        if artifact not in self.allowed_artifacts:
            raise PolicyViolation(
                "allowed_artifacts",
                f"this {message_type} instruction would release `{artifact}`, which the site "
                f"does not allow (allowed: {sorted(self.allowed_artifacts)})",
            )
        if message_type == "evaluate" and self.require_secure_aggregation:
            # An evaluation reply is this client's loss, accuracy and example count in
            # plaintext: exactly what secure aggregation is there to hide.
            raise PolicyViolation(
                "require_secure_aggregation",
                "the site sends nothing per client in plaintext (it trains only under "
                "secure aggregation); federated evaluation replies are plaintext, so this "
                "site does not evaluate (set federated_eval_every=0)",
            )
        if message_type != "train":
            return
        if self.require_secure_aggregation and not secure:
            raise PolicyViolation(
                "require_secure_aggregation",
                "the site trains only under secure aggregation (secagg stage 3); this train "
                "instruction is a plain one (run with secagg=secaggplus)",
            )
        if self.require_record_level_dp and not record_level_dp:
            raise PolicyViolation(
                "require_record_level_dp",
                "the site trains only with record-level DP-SGD; this run has none "
                "(enable privacy.dpsgd)",
            )
        if self.max_epsilon is not None and not accounts_epsilon:
            raise PolicyViolation(
                "max_epsilon",
                f"the site bounds its epsilon at {self.max_epsilon:g}, but this round has no "
                "client-side accounting (neither record-level DP-SGD nor local DP), so its "
                "epsilon is unbounded for the site",
            )

    def check_share(self, artifact: str, shared: list[str]) -> None:
        """Raise :class:`PolicyViolation` unless the declared artifact is allowed and every
        parameter in ``shared`` (the names the run's share.layers select) may leave."""
        if artifact not in self.allowed_share_artifacts:
            raise PolicyViolation(
                "allowed_share_artifacts",
                f"the run declares share.artifact={artifact}; the site sends only "
                f"{sorted(self.allowed_share_artifacts)}",
            )
        outside = not_covered(shared, self.shareable_layers)
        if outside:
            raise PolicyViolation(
                "shareable_layers",
                f"the run's share.layers would send {outside}, which the site keeps "
                f"(it shares only {list(self.shareable_layers)}); narrow share.layers",
            )

    def check_epsilon(self, kind: str, epsilon: float) -> None:
        """Raise :class:`PolicyViolation` if ``epsilon`` (projected after the round) is too large.

        ``kind`` names the accountant in the message ("record-level", "local").
        """
        if self.max_epsilon is not None and not epsilon <= self.max_epsilon:
            raise PolicyViolation(
                "max_epsilon",
                f"{kind} epsilon would reach {epsilon:.4g} after this round, above the site's "
                f"max_epsilon {self.max_epsilon:g}",
            )
