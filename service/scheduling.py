"""Which queued job a free worker starts: fair shares across teams.

Every job is sent once, as a `jobs.run` message naming it, when it is created. Started in message
order, one team's 50 queued jobs would hold another team's one job back until all 50 had run. So a
worker treats a message as "a worker is free on this queue" and starts the fairest queued job of
its queue (`claim`), whichever job the message names. Each job still has its own message, so there
are never fewer messages than queued jobs: a job started through another's message leaves its own
message for the next one, and a message whose job has already started or ended starts the fairest
other job, or nothing.

The fair order (`order`) is a round robin over teams: the team with the fewest running jobs goes
first; among teams with as many, the one that started a job least recently (a team that never did
goes first); within a team, its oldest job. `order` plays that out over the whole queue, counting
each job it places as started, which also gives every queued job its expected position
(`positions`, shown on the job). A position can grow: a team that submits later may be placed
before a waiting job, as round robin intends.

The queue is the job's own (`jobs.queue`, the API's `GATT_JOB_QUEUE`): a worker only starts jobs
sent to the queue it serves. Jobs with no queue (created before the column) run from their own
message only.
"""

from __future__ import annotations

import heapq
import itertools
import math
import uuid
from collections import defaultdict, deque
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.models import Job, JobStatus
from service.repositories import jobs


@dataclass(frozen=True)
class Queued:
    id: uuid.UUID
    team_id: uuid.UUID


def order(session: Session, queue: str) -> list[Queued]:
    """The queued jobs of `queue` in the order fair shares would start them."""
    rows = session.execute(
        select(Job.id, Job.team_id)
        .where(Job.queue == queue, Job.status == JobStatus.QUEUED, Job.cancel_requested.is_(False))
        .order_by(Job.created_at, Job.id)
    ).all()
    if not rows:
        return []
    waiting: dict[uuid.UUID, deque[uuid.UUID]] = defaultdict(deque)
    for id, team in rows:
        waiting[team].append(id)
    teams = list(waiting)
    running = dict(
        session.execute(
            select(Job.team_id, func.count())
            .where(Job.team_id.in_(teams), Job.status == JobStatus.RUNNING)
            .group_by(Job.team_id)
        ).all()
    )
    last_start = dict(
        session.execute(
            select(Job.team_id, func.max(Job.started_at)).where(Job.team_id.in_(teams)).group_by(Job.team_id)
        ).all()
    )
    # (running jobs, last start, tie-break) per team; the first tuple is the team whose turn it is.
    # A job placed counts as started now, after every real start: simulated starts count on from
    # `later`, so teams with as many running jobs take turns.
    later = itertools.count(1)
    heap = []
    for rank, team in enumerate(teams):  # rank: teams in the order of their oldest queued job
        started = last_start.get(team)
        heap.append((running.get(team, 0), (0, started.timestamp() if started else -math.inf), rank, team))
    heapq.heapify(heap)
    placed: list[Queued] = []
    while heap:
        count, _, rank, team = heapq.heappop(heap)
        placed.append(Queued(waiting[team].popleft(), team))
        if waiting[team]:
            heapq.heappush(heap, (count + 1, (1, next(later)), rank, team))
    return placed


def positions(session: Session, queue: str) -> dict[uuid.UUID, int]:
    """Each queued job of `queue`: how many queued jobs are expected to start before it."""
    return {q.id: i for i, q in enumerate(order(session, queue))}


def claim(session: Session, hint: uuid.UUID, owner: str, lease_s: float, queue: str) -> Job | None:
    """Start the job a `jobs.run` message for `hint` should start on `queue` (the module says which),
    with `owner` holding its lease; None when there is nothing to start.

    A running job whose lease expired (its worker vanished) is taken over first: its message is
    the one that was redelivered."""
    mine = jobs.get_any(session, hint)
    if mine is not None and mine.status == JobStatus.RUNNING:
        taken = jobs.claim(session, hint, owner, lease_s)  # only if the lease expired
        if taken is not None:
            return taken
    for _ in range(3):  # another worker may start the same job first: look again
        fair = order(session, queue)
        target = _pick(fair, mine, queue)
        if target is None:
            return None
        started = jobs.claim(session, target, owner, lease_s)
        if started is not None:
            return started
        if mine is not None:
            session.refresh(mine)
    return None


def _pick(fair: list[Queued], mine: Job | None, queue: str) -> uuid.UUID | None:
    if mine is not None and mine.status == JobStatus.QUEUED and mine.queue != queue:
        return mine.id  # a job of no queue (created before queues were recorded), or sent here by hand
    return fair[0].id if fair else None
