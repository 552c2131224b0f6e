"""fl-app's ClientApp (Flower Message API: ``@app.train``, ``@app.evaluate``).

The same object serves simulation (``run_simulation`` / the in-process Grid) and
deployment (``flwr run`` on SuperNodes; ``[tool.flwr.app.components] clientapp``):
everything a client needs arrives in the instruction (global weights + JSON client
spec, see :mod:`fl_app.client_spec`) or in its SuperNode's ``--node-config``
(``partition-id``/``num-partitions`` for simulated partitions, ``data-path`` for an
institution's own file). The handlers here decode, run and encode; the work is in the
package's other modules (docs/architecture.md, Client):

* :mod:`fl_app.client.instruction`: decode the instruction, the client's own checks,
  data and model;
* :mod:`fl_app.client.train`: a train instruction: pipeline, privacy stages, the reply;
* :mod:`fl_app.client.pipeline`: the fixed order of the privacy stages;
* :mod:`fl_app.client.dp_stages`: clip, local DP and DP-SGD wired to this site's state;
* :mod:`fl_app.client.enforce`: the site policy (:mod:`fl_app.client.policy`) per request;
* :mod:`fl_app.client.budget`: the site's budget ledger across runs;
* :mod:`fl_app.client.downgrade`: no weaker protection within a run;
* :mod:`fl_app.client.audit`: the site's audit log around each instruction;
* :mod:`fl_app.client.identity`: node-config keys, the site's stable identity;
* :mod:`fl_app.client.state`: the privacy state stores' memory in ``Context.state``.

Torch is imported only inside the handlers that train or evaluate: deployment starts
a fresh ClientApp process per message, and the key-exchange stages of secure
aggregation must not pay for a torch import.

A client that cannot do what it is asked (malformed spec, no usable data) replies
with a structured error (code ``CLIENT_REFUSED``) naming the problem; anything else
that raises is turned into an error reply by Flower's runtime.

Two node-config keys are the site's own controls:

``policy-path``  the site's data-use policy (:mod:`fl_app.client.policy`), checked for
                 every train (plain or secure-aggregation stage 3) and evaluate
                 instruction before data is loaded; projected ε is checked against it
                 before any privacy state is saved. A violation is a refusal naming the
                 policy field (``BUDGET_EXHAUSTED`` for ``max_epsilon``, so the server
                 stops asking, else ``CLIENT_REFUSED``).
``audit-dir``    the site's hash-chained audit log (:mod:`fl_app.client.audit`), one file
                 per run and site; a log that fails verification stops the client.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from flwr.app import Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fl_app.client.audit import ClientAudit
from fl_app.client.enforce import site_policy
from fl_app.client.identity import POLICY_PATH_KEY
from fl_app.client.instruction import prepare
from fl_app.client.personal import site_layers
from fl_app.client.refusal import ClientRefusal, secagg_refusal
from fl_app.client.train import train
from fl_app.protocol import METRICS_KEY, NUM_EXAMPLES, SERVER_ROUND

__all__ = [
    "WARM_MODULES",
    "app",
    "handle_evaluate",
    "handle_train",
    "prewarm",
    "refusals_as_errors",
]

log = logging.getLogger("fl_app.client")


def handle_train(msg: Message, context: Context) -> Message:
    """Train on local data and reply with the update Δ (see :mod:`fl_app.client.pipeline`).

    Under secure aggregation the instruction carries a stage marker: stages 1, 2, 4 and 5
    (key exchange, unmasking, the consistency check) are handled without torch by
    :mod:`fl_app.secagg.client`; stage 3 trains as below, then encodes and masks, and
    replies with the masked vector.
    """
    from fl_app.secagg.client import (
        MaskedInputStage,
        SecAggStageError,
        handle_key_stage,
        secagg_stage,
        wipe_state,
    )

    try:
        stage = secagg_stage(msg)
        if stage is not None and stage != 3:
            # The site's policy also sets its secure-aggregation floor (safe defaults).
            return handle_key_stage(msg, context, stage, site_policy(context))
    except SecAggStageError as err:
        raise secagg_refusal(err) from err
    try:
        policy = site_policy(context)
        secure = MaskedInputStage.from_instruction(msg, context, policy) if stage == 3 else None
    except SecAggStageError as err:
        raise secagg_refusal(err) from err
    except ClientRefusal:
        if stage == 3:
            wipe_state(context)
        raise
    if secure is None:
        return train(msg, context, None, policy)
    try:
        return train(msg, context, secure, policy)
    except SecAggStageError as err:
        wipe_state(context)
        raise ClientRefusal(f"secure aggregation: {err}") from err
    except BaseException:
        wipe_state(context)  # the round is over for this client: no secret outlives it
        raise


def handle_evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on the local validation split.

    Refused under local DP: the loss, accuracy and example count would reach a server
    that this client trusts only with noised updates (the server turns federated
    evaluation off there; this is the client's own check, before any data is read).
    """
    from fl_app.training import evaluate
    from fl_app.weights import load_ndarrays

    spec, rnd, arrays, _config, _pid, data, model = prepare(
        msg, context, site_policy(context), "evaluate"
    )
    if len(data.val) == 0:
        raise ClientRefusal("no local validation examples (dataset.val_fraction or partition size)")
    # The site's own kept layers (share.layers) with the global shared ones: the
    # personalized model is what this site evaluates.
    site = site_layers(spec, context, model, arrays, None, "evaluate")
    load_ndarrays(model, site.full_model(arrays))
    stats = evaluate(model, data.val.x, data.val.y, batch_size=max(256, spec.train.batch_size))
    metrics = MetricRecord(
        {
            NUM_EXAMPLES: int(stats.num_examples),
            SERVER_ROUND: rnd,
            "eval-loss": float(stats.loss),
            "eval-accuracy": float(stats.accuracy),
        }
    )
    return Message(RecordDict({METRICS_KEY: metrics}), reply_to=msg)


def refusals_as_errors(
    handler: Callable[[Message, Context], Message], message_type: str
) -> Callable[[Message, Context], Message]:
    """The process boundary: refusals become structured error replies, and every
    instruction with a spec leaves a record in the site's audit log (if it keeps one)."""

    def refuse(msg: Message, err: ClientRefusal) -> Message:
        log.warning("refusing %s: %s", msg.metadata.message_type, err)
        return Message(Error(code=err.code, reason=str(err)), reply_to=msg)

    def wrapped(msg: Message, context: Context) -> Message:
        from fl_app.audit import AuditError

        # Flower's log lines once in client processes too (Ray workers also route the
        # root logger to the driver, which printed every Flower line twice).
        logging.getLogger("flwr").propagate = False
        try:
            audit = ClientAudit.open(msg, context, message_type)
        except ClientRefusal as err:
            return refuse(msg, err)
        except AuditError as err:  # the run.start append of a new log failed
            return refuse(msg, ClientRefusal(f"client audit log: {err}"))
        if audit is None:
            try:
                return handler(msg, context)
            except ClientRefusal as err:
                return refuse(msg, err)
        try:
            try:
                reply = handler(msg, context)
            except ClientRefusal as err:
                try:
                    audit.refused(err)
                except AuditError as audit_err:
                    log.error("client audit log: cannot record a refusal: %s", audit_err)
                return refuse(msg, err)
            try:
                audit.released(reply, policy=bool(context.node_config.get(POLICY_PATH_KEY)))
            except AuditError as err:
                # Nothing leaves the site unrecorded.
                return refuse(msg, ClientRefusal(f"client audit log: {err}; reply withheld"))
            return reply
        finally:
            audit.close()

    wrapped.__name__ = handler.__name__
    wrapped.__doc__ = handler.__doc__
    return wrapped


# What the handlers import lazily (torch, data, the privacy and secure-aggregation
# stages), for :func:`prewarm`. A name missing here costs each message its import, no
# more; tests/test_warm_clientapp.py checks that a plain train message imports nothing
# of fl_app's after prewarm.
WARM_MODULES = (
    "fl_app.audit",
    "fl_app.client.pipeline",
    "fl_app.client.state",
    "fl_app.compression",
    "fl_app.compression_sketch",
    "fl_app.config.errors",
    "fl_app.config.schema",
    "fl_app.data",
    "fl_app.device",
    "fl_app.models",
    "fl_app.privacy.clipping",
    "fl_app.privacy.dpsgd_plan",
    "fl_app.privacy.local",
    "fl_app.privacy.refusal",
    "fl_app.privacy.state",
    "fl_app.secagg.client",
    "fl_app.training",
    "fl_app.weights",
)


def prewarm() -> None:
    """Pay once what every message's first use pays: called by the warm launcher's
    zygote (:mod:`fl_app.deploy.fab_cache`) after it imports this module, before it forks
    one process per message. Measured in a forked child: ~0.1 s of a 0.2 s train message
    was importing the modules above (no bytecode cache in Flower's app folder) and
    OmegaConf's first structured config. Imports only: no site data, keys, state or
    randomness is touched, so each message still starts from code alone."""
    import importlib

    from omegaconf import OmegaConf

    from fl_app.client_spec import ClientSpec

    for name in WARM_MODULES:
        importlib.import_module(name)
    OmegaConf.structured(ClientSpec)


app = ClientApp()
app.train()(refusals_as_errors(handle_train, "train"))
app.evaluate()(refusals_as_errors(handle_evaluate, "evaluate"))
