"""PACS -> app -> PACS: retrieve a study over DICOM, judge it, store the DICOM answer back.

    python -m monai_gamverify.apps.integrations.pacs --from-pacs ORTHANC@127.0.0.1:4242 --study 1.2.3 \\
        [--study 1.2.4 ...] [--to-pacs ORTHANC@127.0.0.1:4242] [--ae-title GAMVERIFY] -m bundles/sos_staging \\
        [--overrides '{"network_name": "small_cnn"}'] [--reference R.nii.gz --verifier V.skops] [--screen S] \\
        [--out results/]

For each study: **C-GET** (study level, Study Root) from ``--from-pacs`` with this AE as the storage SCP on the same
association (no C-MOVE destination to configure on the PACS), :meth:`GamverifyRunner.run_study
<monai_gamverify.apps.integrations.deploy.GamverifyRunner.run_study>` (series selection and checks, the model, the
Comprehensive SR, the Secondary Capture overlay series and, for a segmentation bundle, the SEG, all built in
memory), then **C-STORE** of the answer to ``--to-pacs`` (default: the same PACS). A study whose series cannot be
used gets one SR that says why (naming the series) and nothing else; a study the PACS does not have, or a failure of
the network, is a log line; either way the route goes on with the next study. One JSON line per study on stdout
(status, SOP classes stored, verdict, seconds per step); exit status 1 when a study could not be answered at all.

pynetdicom does the networking (a dependency of the package); highdicom builds the objects (extra ``dicom``). The
MONAI Deploy App SDK is not needed.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from monai_gamverify.apps.integrations.deploy import GamverifyRunner, parse_app_options, runner_kwargs

__all__ = ["PacsNode", "PacsError", "parse_node", "retrieve_study", "store_datasets", "PacsRoute", "main"]

logger = logging.getLogger(__name__)

DEFAULT_AE_TITLE = "GAMVERIFY"
#: storage SOP classes accepted on a C-GET (images the app reads, and what a study commonly holds besides)
RETRIEVE_SOP_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.2",  # CT Image
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image
    "1.2.840.10008.5.1.4.1.1.4",  # MR Image
    "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR Image
    "1.2.840.10008.5.1.4.1.1.128",  # PET Image
    "1.2.840.10008.5.1.4.1.1.20",  # NM Image
    "1.2.840.10008.5.1.4.1.1.1",  # CR Image
    "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image - For Presentation
    "1.2.840.10008.5.1.4.1.1.6.1",  # Ultrasound Image
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image
    "1.2.840.10008.5.1.4.1.1.7.4",  # Multi-frame True Color Secondary Capture
    "1.2.840.10008.5.1.4.1.1.88.11",  # Basic Text SR
    "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
    "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
    "1.2.840.10008.5.1.4.1.1.88.67",  # X-Ray Radiation Dose SR
    "1.2.840.10008.5.1.4.1.1.88.59",  # Key Object Selection
    "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation
    "1.2.840.10008.5.1.4.1.1.11.1",  # Grayscale Softcopy Presentation State
    "1.2.840.10008.5.1.4.1.1.481.3",  # RT Structure Set
    "1.2.840.10008.5.1.4.1.1.104.1",  # Encapsulated PDF
)
#: the image classes the app reads: also offered in every compressed syntax below, one presentation context each
#: (an acceptor takes one syntax per context, and a PACS that cannot transcode sends a compressed instance only
#: through a context of its own syntax), so a series no decoder here reads is named in the SR instead of failing
#: the retrieval
COMPRESSED_SOP_CLASSES = RETRIEVE_SOP_CLASSES[:6] + ("1.2.840.10008.5.1.4.1.1.7",)
UNCOMPRESSED_TRANSFER_SYNTAXES = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
)
COMPRESSED_TRANSFER_SYNTAXES = (
    "1.2.840.10008.1.2.5",  # RLE Lossless
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
)
_NODE = re.compile(r"^(?P<aet>[^@\s]{1,16})@(?P<host>[^:\s]+):(?P<port>\d{1,5})$")


class PacsError(RuntimeError):
    """A DICOM network operation failed (association refused, operation failed); the message names the node."""


@dataclass(frozen=True)
class PacsNode:
    """A DICOM application entity: AE title, host, port."""

    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def parse_node(text: str) -> PacsNode:
    """``"AE@host:port"`` -> :class:`PacsNode`.

    Raises:
        ValueError: not of that form (AE title at most 16 characters, port 1-65535).

    Example:
        >>> parse_node("ORTHANC@127.0.0.1:4242")
        PacsNode(ae_title='ORTHANC', host='127.0.0.1', port=4242)
    """
    m = _NODE.match(text.strip())
    if not m or not 0 < int(m["port"]) < 65536:
        raise ValueError(f"expected a DICOM node as AE@host:port (AE title up to 16 characters), got {text!r}")
    return PacsNode(m["aet"], m["host"], int(m["port"]))


def _ae(ae_title: str) -> Any:
    from pynetdicom import AE

    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    ae.maximum_pdu_size = 131072  # what the peer may send us (C-GET); pynetdicom's default is 16 KB
    return ae


def _associate(ae: Any, node: PacsNode, **kwargs: Any) -> Any:
    assoc = ae.associate(node.host, node.port, ae_title=node.ae_title, **kwargs)
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "not established"
        raise PacsError(f"association with {node} as {ae.ae_title} {why} (is the node up and this AE known to it?)")
    try:  # each DIMSE message is written in pieces: without TCP_NODELAY every instance waits for a delayed ACK
        assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError) as err:  # another pynetdicom layout: slower, not wrong
        logger.debug("TCP_NODELAY not set on the association with %s: %s", node, err)
    return assoc


def retrieve_study(node: PacsNode, study_uid: str, *, ae_title: str = DEFAULT_AE_TITLE) -> list[Any]:
    """Every instance of a study, by C-GET (Study Root, STUDY level), as pydicom datasets.

    Args:
        node: the PACS.
        study_uid: StudyInstanceUID.
        ae_title: this application's AE title (the PACS must know it).

    Returns:
        The instances (with ``file_meta``; pixel data as sent, compressed or not). Empty when the PACS has no such
        study.

    Raises:
        PacsError: association refused, or the C-GET failed (a sub-operation failure is logged, not raised).
    """
    from pydicom.dataset import Dataset
    from pynetdicom import build_role, evt
    from pynetdicom.sop_class import (
        StudyRootQueryRetrieveInformationModelFind,
        StudyRootQueryRetrieveInformationModelGet,
    )

    received: list[Any] = []

    def on_store(event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        received.append(ds)
        return 0x0000

    ae = _ae(ae_title)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    for uid in RETRIEVE_SOP_CLASSES:
        ae.add_requested_context(uid, list(UNCOMPRESSED_TRANSFER_SYNTAXES))
    for uid in COMPRESSED_SOP_CLASSES:
        for syntax in COMPRESSED_TRANSFER_SYNTAXES:
            ae.add_requested_context(uid, [syntax])
    roles = [build_role(uid, scp_role=True) for uid in RETRIEVE_SOP_CLASSES]
    assoc = _associate(ae, node, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    final = None
    try:
        # C-FIND first: a PACS answers a C-GET of an unknown study with a failure, not with zero instances
        matches = [
            ident
            for status, ident in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)
            if status is not None and int(getattr(status, "Status", 0)) in (0xFF00, 0xFF01)
        ]
        if not matches:
            return []
        for status, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet):
            if status is not None and "Status" in status:
                final = status
    finally:
        assoc.release()
    if final is None:
        raise PacsError(f"C-GET of study {study_uid} from {node}: no answer (connection lost?)")
    code = int(final.Status)
    failed = int(getattr(final, "NumberOfFailedSuboperations", 0) or 0)
    if code not in (0x0000, 0xB000) and not received:
        raise PacsError(f"C-GET of study {study_uid} from {node} failed with status 0x{code:04X}")
    if failed:
        logger.warning(
            "C-GET of study %s from %s: %d instance(s) not sent (SOP class or syntax)", study_uid, node, failed
        )
    return received


def store_datasets(
    node: PacsNode, datasets: Sequence[Any], *, ae_title: str = DEFAULT_AE_TITLE, associations: int = 1
) -> list[str]:
    """C-STORE datasets to a node.

    Args:
        node: the destination.
        datasets: what to store (each with ``file_meta``).
        ae_title: this application's AE title.
        associations: parallel associations (instances dealt round-robin): a PACS answers each C-STORE after
            writing it, so one association waits that long per instance.

    Returns:
        The SOP Instance UIDs stored.

    Raises:
        PacsError: association refused or an instance refused (naming it and the status).
    """
    if not datasets:
        return []
    n = max(1, min(int(associations), len(datasets)))
    if n == 1:
        return _store_one_association(node, datasets, ae_title)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(n, thread_name_prefix="c-store") as pool:
        parts = list(pool.map(lambda i: _store_one_association(node, datasets[i::n], ae_title), range(n)))
    return [uid for part in parts for uid in part]


def _store_one_association(node: PacsNode, datasets: Sequence[Any], ae_title: str) -> list[str]:
    ae = _ae(ae_title)
    pairs = sorted({(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets})
    for sop_class, syntax in pairs:
        ae.add_requested_context(sop_class, syntax)
    assoc = _associate(ae, node)
    stored: list[str] = []
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            code = int(getattr(status, "Status", -1)) if status is not None else -1
            if code not in (0x0000, 0xB000, 0xB007, 0xB006):
                raise PacsError(
                    f"C-STORE of {getattr(ds.SOPClassUID, 'name', ds.SOPClassUID)} {ds.SOPInstanceUID} to {node} "
                    f"failed (status {'none' if code < 0 else f'0x{code:04X}'}); {len(stored)} stored before it"
                )
            stored.append(str(ds.SOPInstanceUID))
    finally:
        assoc.release()
    return stored


class PacsRoute:
    """Retrieve, judge, store back; one study at a time, bad ones answered and skipped.

    Args:
        runner: the :class:`~monai_gamverify.apps.integrations.deploy.GamverifyRunner` (bundle loaded once).
        source: the PACS studies come from.
        destination: where the answer goes (default: ``source``).
        ae_title: this application's AE title.
        associations: parallel C-STORE associations for the answer (:func:`store_datasets`).

    Example:
        >>> route = PacsRoute(GamverifyRunner("bundles/sos_staging", "out"), parse_node("ORTHANC@127.0.0.1:4242"))
        >>> route.process("1.2.3")["status"]
        'judged'
    """

    def __init__(
        self,
        runner: GamverifyRunner,
        source: PacsNode,
        destination: PacsNode | None = None,
        *,
        ae_title: str = DEFAULT_AE_TITLE,
        associations: int = 8,
    ) -> None:
        self.runner = runner
        self.associations = associations
        self.source = source
        self.destination = destination or source
        self.ae_title = ae_title

    def process(self, study_uid: str) -> dict[str, Any]:
        """One study: a JSON-ready summary with ``status`` (``judged``, ``not judged`` (an SR says why),
        ``not found`` or ``error``), ``stored`` (SOP classes and counts), and ``times`` (``read``, ``model``,
        ``write``, ``total`` seconds). Never raises."""
        t0 = time.perf_counter()
        try:
            datasets = retrieve_study(self.source, study_uid, ae_title=self.ae_title)
            t_read = time.perf_counter() - t0
            if not datasets:
                logger.error("study %s: %s has no instance of it; nothing to answer", study_uid, self.source)
                return {"study": study_uid, "status": "not found", "stored": {}, "times": {"read": t_read}}
            result = self.runner.run_study(datasets)
            t1 = time.perf_counter()
            store_datasets(self.destination, result.objects, ae_title=self.ae_title, associations=self.associations)
            t2 = time.perf_counter()
        except Exception as err:  # the network or the PACS: a log line, and the next study
            logger.error("study %s: %s: %s", study_uid, type(err).__name__, err)
            return {"study": study_uid, "status": "error", "reason": f"{type(err).__name__}: {err}", "stored": {}}
        out = result.summary()
        out["stored"] = out.pop("objects")
        build = result.times.get("dicom_build", 0.0)
        out["times"] = {
            "read": t_read + result.times.get("volume", 0.0),
            "model": result.times.get("model", 0.0),
            "write": build + (t2 - t1),
            "dicom_build": build,
            "store": t2 - t1,
            "total": t2 - t0,
        }
        return out


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: see the module docstring."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m monai_gamverify.apps.integrations.pacs",
        description="Retrieve studies from a PACS (C-GET), judge them with a bundle, store SR + overlay (+ SEG) back.",
    )
    parser.add_argument("--from-pacs", required=True, help="source PACS as AE@host:port")
    parser.add_argument("--to-pacs", default=None, help="destination as AE@host:port (default: the source)")
    parser.add_argument("--study", action="append", required=True, help="StudyInstanceUID (repeatable)")
    parser.add_argument("--ae-title", default=DEFAULT_AE_TITLE, help=f"this app's AE title ({DEFAULT_AE_TITLE})")
    parser.add_argument("-m", "--model", required=True, help="bundle, or model path holding one (SDK layout too)")
    parser.add_argument("--associations", type=int, default=8, help="parallel C-STORE associations (8)")
    parser.add_argument("--out", default=None, help="folder for the JSON records and NIfTI maps (default: temporary)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    args, rest = parser.parse_known_args(argv)
    opts, unknown = parse_app_options(rest)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        source = parse_node(args.from_pacs)
        destination = parse_node(args.to_pacs) if args.to_pacs else source
    except ValueError as err:
        parser.error(str(err))
    import tempfile

    with tempfile.TemporaryDirectory(prefix="gamverify_pacs_") as tmp:
        runner = GamverifyRunner(args.model, args.out or tmp, **runner_kwargs(opts))
        route = PacsRoute(runner, source, destination, ae_title=args.ae_title, associations=args.associations)
        failed = 0
        for uid in args.study:
            summary = route.process(uid)
            failed += summary["status"] in ("error", "not found")
            print(json.dumps(summary), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
