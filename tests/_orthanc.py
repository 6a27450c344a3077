"""A real DICOM server for the tests and the benchmark: Orthanc (Debian package ``orthanc``) in a temporary folder.

Orthanc 1.10 has no bind-address option, so "loopback only" is enforced by its own rules: the HTTP API refuses any
client but localhost (``RemoteAccessAllowed: false``), and the DICOM server accepts C-ECHO/C-STORE/C-GET/C-FIND only
from the application entities registered here at 127.0.0.1 (``DicomAlwaysAllow*: false``,
``DicomCheckModalityHost: true``). Ports are free ones picked at start; storage and index live in the folder; no
plugin is loaded; the process is killed when the server is stopped.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

__all__ = ["OrthancServer", "orthanc_binary", "CLIENT_AETS"]

#: the AE titles allowed to talk to the server (the test's own SCU and the app)
CLIENT_AETS = ("GVTEST", "GAMVERIFY")


def orthanc_binary() -> str | None:
    """Path of the Orthanc executable, or ``None``."""
    return shutil.which("Orthanc") or (p if Path(p := "/usr/sbin/Orthanc").is_file() else None)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class OrthancServer:
    """Start Orthanc in ``folder`` on free ports; ``stop()`` (or the context manager) kills it.

    Attributes:
        aet: the server's AE title (``ORTHANC``).
        dicom_port, http_port: its ports.
        node: ``"ORTHANC@127.0.0.1:<dicom_port>"`` for the PACS route.
    """

    aet = "ORTHANC"

    def __init__(self, folder: str | Path, *, start_timeout: float = 30.0) -> None:
        binary = orthanc_binary()
        if binary is None:
            raise FileNotFoundError("Orthanc is not installed (Debian: apt-get install orthanc)")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.dicom_port, self.http_port = _free_port(), _free_port()
        config = {
            "Name": "gamverify-test",
            "StorageDirectory": str(self.folder / "db"),
            "IndexDirectory": str(self.folder / "db"),
            "Plugins": [],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "OrthancExplorerEnabled": False,
            "WebDavEnabled": False,
            "HttpThreadsCount": 4,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowEcho": False,
            "DicomAlwaysAllowStore": False,
            "DicomAlwaysAllowFind": False,
            "DicomAlwaysAllowGet": False,
            "DicomAlwaysAllowMove": False,
            "DicomCheckModalityHost": True,
            "DicomModalities": {aet.lower(): [aet, "127.0.0.1", 104] for aet in CLIENT_AETS},
            "DicomThreadsCount": 8,
            "MaximumPduLength": 131072,  # the largest Orthanc allows (default 16 KB)
            "DicomAssociationCloseDelay": 0,
            "UnknownSopClassAccepted": False,
            "SaveJobs": False,
            "ConcurrentJobs": 1,
            "StableAge": 1,
            "SyncStorageArea": False,  # no fsync per instance: a test server, its folder is thrown away
        }
        self.config_path = self.folder / "orthanc.json"
        self.config_path.write_text(json.dumps(config, indent=1))
        self.log = (self.folder / "orthanc.log").open("wb")
        self.process = subprocess.Popen(
            [binary, "--no-jobs", str(self.config_path)], stdout=self.log, stderr=subprocess.STDOUT
        )
        self.node = f"{self.aet}@127.0.0.1:{self.dicom_port}"
        deadline = time.monotonic() + start_timeout
        while True:
            try:
                self.get("/system")
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    tail = (self.folder / "orthanc.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"Orthanc did not start on 127.0.0.1:{self.http_port}: {tail}") from None
                time.sleep(0.1)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def get(self, path: str, *, raw: bool = False):
        """GET the REST API (``/instances``, ``/instances/<id>/file`` ...): JSON, or bytes with ``raw``."""
        with urllib.request.urlopen(self.url + path, timeout=30) as resp:
            body = resp.read()
        return body if raw else json.loads(body)

    def instances(self, study_uid: str) -> list:
        """Every stored instance of a study as pydicom datasets (REST ``/tools/find`` + ``/instances/<id>/file``)."""
        import io

        import pydicom

        req = urllib.request.Request(
            self.url + "/tools/find",
            data=json.dumps({"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            ids = json.loads(resp.read())
        return [pydicom.dcmread(io.BytesIO(self.get(f"/instances/{i}/file", raw=True))) for i in ids]

    def stop(self) -> None:
        """Kill the server (it holds nothing worth a clean shutdown) and close its log."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.log.close()

    def __enter__(self) -> OrthancServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
