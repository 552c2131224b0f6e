"""Secure aggregation as the round driver's train stage (server side, Message API).

Modules: :mod:`.settings` (run settings, per-round ``(k, t)``), :mod:`.aggregation`
(:class:`SecureAggregation`: the stages of one round, decoding), :mod:`.runner` (one
stage as one exchange), :mod:`.messages` (instructions built, replies parsed),
:mod:`.ahead` (share-ahead), :mod:`.decode` (the unmasked sum checked and decoded),
:mod:`.outcome` (what a round produced).

When ``secagg.mode`` is not ``off``, :class:`~strategies.driver.RoundDriver` hands the
train stage of every round to :meth:`SecureAggregation.run_round`, which runs the
four-stage protocol of Bonawitz et al. (CCS 2017, "Practical Secure Aggregation for
Privacy-Preserving Machine Learning", §4; sparse graph of Bell et al., CCS 2020, for
``secaggplus``) over Flower messages of type ``train``, each marked with
``fl-app.secagg-stage`` (:mod:`fl_app.protocol`):

1. advertise keys (only for clients that hold no key pair for this round: a stage-1
reply carries fresh pairs for ``secagg.key_rounds`` rounds, so later rounds skip it);
2. share keys with the round's parameters (the server routes the encrypted Shamir shares);
3. masked input (the usual train instruction: global arrays, client spec, config; the
client trains, clips, encodes and masks); 4. unmask (survivors return the shares the
server needs, never both secrets of one node).

The pure protocol lives in :mod:`fl_app.secagg` (:class:`~fl_app.secagg.ServerSession`);
this module only builds messages, screens and parses replies (a malformed reply becomes
a logged :class:`~strategies.validation.Rejection`, the node counts as dropped and the
round goes on), and decodes the sum (:mod:`fl_app.secagg.vector`). Every stage has its
own timeout. Protocol parameters ``(k, t)`` are derived per round for the sampled
cohort (:func:`fl_app.secagg.derive.derive_params`); the fixed-point codec from
``(bits, clip bound, cohort size)``, so the sum cannot overflow.

What the server learns: public keys, ciphertexts it cannot read, who replied at each
stage, and the sums ``Σ w·Δ``, ``Σ w``, ``Σ unclipped``, ``Σ w·loss``, ``Σ w·accuracy``.
Below the threshold at any stage the round is abandoned (:class:`SecAggOutcome` with
``decoded=None`` and a note): the model stays unchanged and the run goes on.

Server models (``secagg.server_model``): ``honest_but_curious`` runs the stages above;
``malicious`` runs on the complete graph only (``secagg=secagg``; the clients refuse any
neighbourhood but the whole cohort, since they cannot verify a graph the server drew),
adds a run id to stage 1 (clients sign their key pairs for it) and abandons the round
when a sampled client's signed keys are missing, adds the neighbours' roster identities
and signatures to stage 2, and a consistency-check exchange
(:data:`~fl_app.secagg.protocol.Stage.consistency`) between stages 3 and 4: survivors
sign ``U3`` bound to their round keys, the server keeps the signatures that verify
under the key each node advertised (so one faulty client cannot make everyone refuse),
abandons the round below :func:`~fl_app.secagg.params.consistency_quorum` of them, and
sends that many with stage 4 to the signers only (:mod:`fl_app.secagg.signing`).

Trust assumptions: a server of the configured model, at most ``corrupt_fraction`` of the
cohort colluding with it, authenticated client-server channels (Flower's TLS and node
authentication), and clients that clip honestly (the server cannot check a bound on a
masked input; a malicious client can skew, but not reveal, the sum).
"""

from strategies.secagg.aggregation import SecureAggregation
from strategies.secagg.messages import parse_stage_reply
from strategies.secagg.outcome import SecAggOutcome, StageLog
from strategies.secagg.runner import Exchange

__all__ = [
    "Exchange",
    "SecAggOutcome",
    "SecureAggregation",
    "StageLog",
    "parse_stage_reply",
]
