"""Raters, their assignments and their answers, in one SQLite file in the study folder.

Every answer is one committed transaction (WAL journal, synchronous=FULL) before the server
acknowledges it, so a server killed with SIGKILL loses no acknowledged answer. The database's
keys refuse what must not be stored: an answer to a pair that is not the rater's, that was not
shown yet, or that was answered already.
"""

from __future__ import annotations

import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from random import Random

from ..errors import UserError
from .stimuli import Manifest, Pair

DATABASE_FILE = "answers.sqlite"
SIDES = ("left", "right")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS raters (
    token TEXT PRIMARY KEY,
    number INTEGER NOT NULL UNIQUE,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS assignments (
    rater TEXT NOT NULL REFERENCES raters(token),
    position INTEGER NOT NULL,
    pair TEXT NOT NULL,
    real_side TEXT NOT NULL CHECK (real_side IN ('left', 'right')),
    shown_at REAL,
    PRIMARY KEY (rater, position),
    UNIQUE (rater, pair)
);
CREATE TABLE IF NOT EXISTS answers (
    rater TEXT NOT NULL,
    pair TEXT NOT NULL,
    condition TEXT NOT NULL,
    temperature REAL NOT NULL,
    image INTEGER NOT NULL,
    real_side TEXT NOT NULL CHECK (real_side IN ('left', 'right')),
    choice TEXT NOT NULL CHECK (choice IN ('left', 'right')),
    picked_sample INTEGER NOT NULL CHECK (picked_sample IN (0, 1)),
    shown_at REAL NOT NULL,
    answered_at REAL NOT NULL,
    PRIMARY KEY (rater, pair),
    FOREIGN KEY (rater, pair) REFERENCES assignments(rater, pair)
);
"""


class Refused(Exception):
    """A request the store will not carry out; `status` is the HTTP status that fits it."""

    def __init__(self, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Shown:
    """A pair as a rater sees it: which stimulus is on the left and which on the right."""

    pair: Pair
    real_side: str
    position: int
    total: int

    @property
    def left(self) -> str:
        return self.pair.real if self.real_side == "left" else self.pair.sample

    @property
    def right(self) -> str:
        return self.pair.sample if self.real_side == "left" else self.pair.real


@dataclass(frozen=True)
class Answer:
    rater: str
    pair: str
    condition: str
    temperature: float
    image: int
    real_side: str
    choice: str
    picked_sample: bool
    shown_at: float
    answered_at: float


class AnswerStore:
    """The study's database. Thread-safe: one connection, one lock, one transaction a call."""

    def __init__(self, study_dir: str | Path, manifest: Manifest) -> None:
        self.path = Path(study_dir) / DATABASE_FILE
        self.manifest = manifest
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(
                self.path, check_same_thread=False, isolation_level=None, timeout=30
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as err:
            raise UserError(
                f"{self.path} is not a readable answers database ({err}); restore it from a "
                "copy, or move it away to start the study's answers afresh"
            ) from None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _transaction(self):
        return _Transaction(self._db, self._lock)

    # Raters ------------------------------------------------------------------------------------
    def new_rater(self, rng: Random | None = None) -> str:
        """A new opaque rater token with its whole assignment stored: one pair per source image
        (so no real image is seen twice and recognised), the condition and temperature rotated
        across raters (a Latin square), the order and the real side random."""
        rng = rng or Random(secrets.randbits(64))
        token = secrets.token_urlsafe(16)
        with self._transaction() as db:
            number = db.execute("SELECT COUNT(*) FROM raters").fetchone()[0]
            db.execute(
                "INSERT INTO raters (token, number, created) VALUES (?, ?, ?)",
                (token, number, time.time()),
            )
            pairs = self.manifest.assignment(number)
            rng.shuffle(pairs)
            db.executemany(
                "INSERT INTO assignments (rater, position, pair, real_side) VALUES (?, ?, ?, ?)",
                [(token, i, p.id, rng.choice(SIDES)) for i, p in enumerate(pairs)],
            )
        return token

    def _check_rater(self, db, rater: str) -> int:
        """The rater's number of assigned pairs; an unknown token is refused."""
        if isinstance(rater, str):
            found = db.execute("SELECT COUNT(*) FROM assignments WHERE rater = ?", (rater,))
            total = found.fetchone()[0]
            if total:
                return total
        raise Refused("unknown rater token: start again from the study's first page", 404)

    # Pairs and answers -------------------------------------------------------------------------
    def next_pair(self, rater: str) -> Shown | None:
        """The rater's first unanswered pair (the same one again until it is answered), its
        first showing time recorded; None when the rater has answered all of theirs."""
        with self._transaction() as db:
            total = self._check_rater(db, rater)
            row = db.execute(
                "SELECT a.position, a.pair, a.real_side, a.shown_at FROM assignments a "
                "LEFT JOIN answers b ON b.rater = a.rater AND b.pair = a.pair "
                "WHERE a.rater = ? AND b.pair IS NULL ORDER BY a.position LIMIT 1",
                (rater,),
            ).fetchone()
            if row is None:
                return None
            position, pair_id, real_side, shown_at = row
            if shown_at is None:
                db.execute(
                    "UPDATE assignments SET shown_at = ? WHERE rater = ? AND position = ?",
                    (time.time(), rater, position),
                )
        return Shown(self.manifest.pair(pair_id), real_side, position, total)

    def answer(self, rater: str, pair_id: str, choice: str) -> Answer:
        """Store one answer, committed before this returns; refuse an unknown rater or pair,
        a pair not assigned to the rater or not shown to them yet, and a second answer."""
        if choice not in SIDES:
            raise Refused(f"choice must be 'left' or 'right', got {choice!r}", 400)
        if not isinstance(pair_id, str) or not self.manifest.has_pair(pair_id):
            raise Refused("unknown pair", 404)
        with self._transaction() as db:
            self._check_rater(db, rater)
            row = db.execute(
                "SELECT real_side, shown_at FROM assignments WHERE rater = ? AND pair = ?",
                (rater, pair_id),
            ).fetchone()
            if row is None:
                raise Refused("this pair is not assigned to this rater")
            real_side, shown_at = row
            if shown_at is None:
                raise Refused("this pair has not been shown to this rater yet")
            pair = self.manifest.pair(pair_id)
            answer = Answer(
                rater=rater,
                pair=pair_id,
                condition=pair.condition,
                temperature=pair.temperature,
                image=pair.image,
                real_side=real_side,
                choice=choice,
                picked_sample=choice != real_side,
                shown_at=shown_at,
                answered_at=time.time(),
            )
            try:
                db.execute(
                    "INSERT INTO answers VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        answer.rater,
                        answer.pair,
                        answer.condition,
                        answer.temperature,
                        answer.image,
                        answer.real_side,
                        answer.choice,
                        int(answer.picked_sample),
                        answer.shown_at,
                        answer.answered_at,
                    ),
                )
            except sqlite3.IntegrityError:
                raise Refused("this pair was answered already") from None
        return answer

    def progress(self, rater: str) -> tuple[int, int]:
        """(answered, assigned) for one rater."""
        with self._transaction() as db:
            total = self._check_rater(db, rater)
            done = db.execute("SELECT COUNT(*) FROM answers WHERE rater = ?", (rater,)).fetchone()
        return done[0], total

    def answers(self) -> list[Answer]:
        """Every stored answer, in the order they were given."""
        with self._transaction() as db:
            rows = db.execute("SELECT * FROM answers ORDER BY answered_at, rater").fetchall()
        return [Answer(*row[:7], bool(row[7]), *row[8:]) for row in rows]


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT under the store's lock; ROLLBACK on any error."""

    def __init__(self, db: sqlite3.Connection, lock: threading.Lock) -> None:
        self.db, self.lock = db, lock

    def __enter__(self) -> sqlite3.Connection:
        self.lock.acquire()
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self.lock.release()
            raise
        return self.db

    def __exit__(self, kind, value, traceback) -> None:
        try:
            self.db.execute("ROLLBACK" if kind else "COMMIT")
        finally:
            self.lock.release()


def read_answers(study_dir: str | Path, manifest: Manifest) -> list[Answer]:
    """The answers of a study folder, for the report (an empty list before the first one)."""
    if not (Path(study_dir) / DATABASE_FILE).exists():
        return []
    store = AnswerStore(study_dir, manifest)
    try:
        return store.answers()
    finally:
        store.close()
