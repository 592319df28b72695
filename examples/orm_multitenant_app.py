"""A multi-tenant app on the ORM: tenants spread over partitions, one ShardedSession for all.

    python examples/orm_multitenant_app.py

Creates four scratch databases on the server named by PARTPOOL_URL (an admin
URL such as postgresql://postgres@127.0.0.1/postgres), or on an embedded
throwaway server when PARTPOOL_URL is not set, and removes them at the end.

The models say where their rows live, and the session does the rest:

* ``Tenant`` is routed by its id, ``Project`` and ``Task`` by their
  ``tenant_id``; ``Plan`` is a reference table, copied to every partition;
* project and task ids come from an :class:`IdGenerator`, so
  ``session.get(Project, id)`` finds the partition from the id alone;
* a request runs inside ``with sharded.pinned(tenant_id):``, where a query
  that would reach another tenant's partition raises ``PinViolation``;
* ``add_all`` of objects for many tenants in one flush, one batch per partition;
* ``session.get``, a lazy load and ``selectinload``, all on the tenant's partition;
* cross-tenant reports (ORDER BY + LIMIT, count and GROUP BY) merged into
  the answer one database would give;
* ``session.execute(insert(Task), rows)`` split by tenant, and a rollback.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from sqlalchemy import (
    BigInteger,
    ForeignKey,
    ForeignKeyConstraint,
    String,
    UniqueConstraint,
    event,
    func,
    insert,
    inspect,
    select,
    update,
)
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    mapped_column,
    relationship,
    selectinload,
    sessionmaker,
)

from sqlalchemy_partpool import (
    HashRouter,
    IdGenerator,
    PinViolation,
    ShardedEngine,
    ShardedSession,
    create_sharded_engine,
)
from sqlalchemy_partpool.testing import scratch_partitions

PARTITIONS = ["p0", "p1", "p2", "p3"]

# The models below need the id generator when they are declared, before any
# engine exists, so the router is made first and handed to
# create_sharded_engine(..., router=ROUTER).  With the engine made at import
# time, ``ids = sharded.id_generator(worker_id=1)`` is the same thing.
ROUTER = HashRouter(PARTITIONS)
ids = IdGenerator(ROUTER, worker_id=1)  # one worker id per process


class Base(DeclarativeBase):
    pass


class Plan(Base):
    """Price plans: the same few rows on every partition, so tenants can join them locally."""

    __tablename__ = "plans"
    __reference_table__ = True

    code: Mapped[str] = mapped_column(String(10), primary_key=True)
    name: Mapped[str]
    monthly_price: Mapped[int]


class Tenant(Base):
    __tablename__ = "tenants"
    __shard_key__ = "id"  # a tenant lives on the partition of its own id

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str]
    plan_code: Mapped[str] = mapped_column(ForeignKey("plans.code"))

    plan: Mapped[Plan] = relationship()
    projects: Mapped[list[Project]] = relationship(back_populates="tenant")


class Project(Base):
    __tablename__ = "projects"
    __shard_key__ = "tenant_id"
    __table_args__ = (UniqueConstraint("tenant_id", "id"),)

    # a 64-bit id carrying the hash bucket of tenant_id: get() needs nothing else
    id: Mapped[int] = ids.mapped_column("tenant_id")
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"))
    name: Mapped[str]

    tenant: Mapped[Tenant] = relationship(back_populates="projects")
    tasks: Mapped[list[Task]] = relationship(back_populates="project")


class Task(Base):
    """A task carries its tenant's id, like every tenant-owned table.

    The foreign key includes tenant_id, so the database itself keeps a task
    with its project's tenant, and ``Task(project=p)`` takes its shard key
    from ``p``.  Carrying the key (rather than ``__shard_key__ = "project"``,
    following the parent) lets a task be inserted from a plain row with
    ``session.execute(insert(Task), rows)`` and found by its id alone.
    """

    __tablename__ = "tasks"
    __shard_key__ = "tenant_id"
    __table_args__ = (
        ForeignKeyConstraint(["tenant_id", "project_id"], ["projects.tenant_id", "projects.id"]),
    )

    id: Mapped[int] = ids.mapped_column("tenant_id")
    tenant_id: Mapped[int]
    project_id: Mapped[int] = mapped_column(BigInteger)  # holds an IdGenerator id
    title: Mapped[str]
    done: Mapped[bool] = mapped_column(default=False)

    project: Mapped[Project] = relationship(back_populates="tasks")


PLANS = [("free", "Free", 0), ("team", "Team", 49), ("enterprise", "Enterprise", 499)]
TENANTS = {
    1: "acme", 2: "aperture", 3: "cyberdyne", 4: "globex", 5: "hooli", 6: "initech",
    7: "soylent", 8: "stark", 9: "tyrell", 10: "umbrella", 11: "wayne", 12: "wonka",
}  # fmt: skip


ALL_TASKS = select(func.count()).select_from(Task)


def plan_of(tenant_id: int) -> str:
    return PLANS[tenant_id % len(PLANS)][0]


class StatementLog:
    """Counts the SQL statements each partition receives, to show where things go."""

    def __init__(self, sharded: ShardedEngine) -> None:
        self.seen: dict[str, list[str]] = {name: [] for name in sharded.partitions}
        for name, engine in sharded.engines():
            event.listen(engine, "before_cursor_execute", self._listener(name))

    def _listener(self, name: str) -> Any:
        def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            self.seen[name].append(statement.split(None, 1)[0].upper())

        return record

    def take(self) -> dict[str, Counter[str]]:
        """Statements by partition and kind since the last call (partitions that got any)."""
        taken = {name: Counter(s) for name, s in self.seen.items() if s}
        for statements in self.seen.values():
            statements.clear()
        return taken

    def partitions(self) -> list[str]:
        return sorted(self.take())


def section(title: str) -> None:
    print(f"\n== {title}")


def main(partitions: dict[str, str]) -> None:
    with create_sharded_engine(
        partitions, router=ROUTER, min_connections=1, max_connections=4
    ) as sharded:
        for _, engine in sharded.engines():
            Base.metadata.create_all(engine)
        log = StatementLog(sharded)
        # the easy path: the session's choosers come from the router and the models
        Session = sessionmaker(class_=ShardedSession, sharded=sharded)

        section("Reference data: plans, copied to every partition")
        with Session() as session:
            session.add_all([Plan(code=c, name=n, monthly_price=p) for c, n, p in PLANS])
            session.commit()
        for name, engine in sharded.engines():
            with engine.connect() as conn:
                count = conn.scalar(select(func.count()).select_from(Plan))
            print(f"{name}: {count} plans")
            assert count == len(PLANS)
        log.take()

        signup(sharded, Session, log)
        handle_requests(sharded, Session, log)
        get_by_id(sharded, Session, log)
        bulk_import(sharded, Session, log)
        reports(sharded, Session)
        rollback(sharded, Session)


def signup(
    sharded: ShardedEngine, Session: sessionmaker[ShardedSession], log: StatementLog
) -> None:
    """Twelve tenants with their projects and tasks, added in one go and flushed at once."""
    section("Sign-up: add_all for 12 tenants, one flush")
    with Session() as session:
        for tenant_id, name in TENANTS.items():
            tenant = Tenant(id=tenant_id, name=name, plan_code=plan_of(tenant_id))
            for p in range(2):
                project = Project(tenant_id=tenant_id, name=f"{name} project {p + 1}")
                project.tasks = [Task(title=f"task {t + 1}") for t in range(3)]
                tenant.projects.append(project)
            session.add(tenant)
        session.commit()
    for name in sharded.partitions:
        here = [t for t, n in TENANTS.items() if sharded.partition_for(t) == name]
        print(f"{name}: tenants {', '.join(TENANTS[t] for t in here)}")
    # Objects alternate between partitions in add order; the flush groups them
    # so each partition gets one batched INSERT per table, not one per row.
    for name, kinds in log.take().items():
        print(f"  {name} received {kinds['INSERT']} INSERT statements")
        assert kinds["INSERT"] <= 3  # tenants, projects, tasks


def handle_request(Session: sessionmaker[ShardedSession], tenant_id: int) -> list[str]:
    """What a web request for one tenant does: read its projects and tasks, close a task."""
    with Session() as session:
        tenant = session.get(Tenant, tenant_id)
        assert tenant is not None
        lines = [f"{tenant.name} ({tenant.plan.name} plan)"]  # plan: a local copy
        for project in tenant.projects:  # lazy load, on the tenant's partition
            open_tasks = [t.title for t in project.tasks if not t.done]
            lines.append(f"  {project.name}: open {', '.join(open_tasks)}")
        first = tenant.projects[0].tasks[0]
        first.done = True
        session.commit()
        # the same, eagerly: one SELECT per relationship, on the one partition
        projects = session.scalars(
            select(Project)
            .where(Project.tenant_id == tenant_id)
            .options(selectinload(Project.tasks))
            .order_by(Project.id)
        ).all()
        done = sum(t.done for p in projects for t in p.tasks)
        lines.append(f"  selectinload: {len(projects)} projects, {done} task done")
        assert done == 1
        return lines


def handle_requests(
    sharded: ShardedEngine, Session: sessionmaker[ShardedSession], log: StatementLog
) -> None:
    section("Requests: each one pinned to its tenant's partition")
    for tenant_id in (3, 8):
        with sharded.pinned(tenant_id):
            for line in handle_request(Session, tenant_id):
                print(line)
        touched = log.partitions()
        print(f"  statements went to {touched} only")
        assert touched == [sharded.partition_for(tenant_id)]

    # A bug that forgets the tenant filter is stopped before it reads anyone's data.
    with sharded.pinned(3), Session() as session:
        try:
            session.scalars(select(Task).where(Task.done.is_(False))).all()
        except PinViolation as exc:
            print(f"\nunfiltered query inside pinned(3): PinViolation: {exc}")
        else:
            raise AssertionError("a cross-tenant query inside pinned() must raise")
        # the same query filtered by the tenant is fine
        open_tasks = session.scalars(
            select(Task).where(Task.tenant_id == 3, Task.done.is_(False))
        ).all()
        print(f"filtered by tenant 3: {len(open_tasks)} open tasks")
        assert len(open_tasks) == 5


def get_by_id(
    sharded: ShardedEngine, Session: sessionmaker[ShardedSession], log: StatementLog
) -> None:
    section("session.get() by id alone: the id names its partition")
    with Session() as session:
        project_id, tenant_id = session.execute(
            select(Project.id, Project.tenant_id).where(Project.tenant_id == 11).limit(1)
        ).one()
        session.expunge_all()
        log.take()
        project = session.get(Project, project_id)
        assert project is not None
        asked = log.partitions()
        print(f"Project {project_id}: {project.name!r}, asked {asked}")
        assert asked == [sharded.partition_for(tenant_id)] == [ids.partition_of(project_id)]
        task = session.get(Task, project.tasks[0].id)
        assert task is not None
        assert task.project is project


def bulk_import(
    sharded: ShardedEngine, Session: sessionmaker[ShardedSession], log: StatementLog
) -> None:
    section("Bulk import: session.execute(insert(Task), rows) for every tenant")
    with Session() as session:
        projects = session.execute(select(Project.tenant_id, Project.id)).all()
        rows = [
            {"tenant_id": tenant_id, "project_id": project_id, "title": f"imported {n + 1}"}
            for tenant_id, project_id in projects
            for n in range(5)
        ]
        log.take()
        session.execute(insert(Task), rows)
        session.commit()
    inserts = {name: kinds["INSERT"] for name, kinds in log.take().items()}
    print(f"{len(rows)} rows, INSERT statements per partition: {inserts}")
    assert set(inserts.values()) == {1}


def reports(sharded: ShardedEngine, Session: sessionmaker[ShardedSession]) -> None:
    """Cross-tenant reports: every partition at once, merged into one correct answer."""
    section("Reports across tenants (all partitions, concurrently, merged)")
    with Session() as session:
        total = session.execute(ALL_TASKS).scalar_one()
        expected_total = len(TENANTS) * 2 * (3 + 5)
        print(f"tasks in total: {total}")
        assert total == expected_total

        # ORDER BY + LIMIT: the global top five, not five per partition
        last = session.scalars(select(Tenant).order_by(Tenant.id.desc()).limit(5)).all()
        shown = ", ".join(f"{t.id} {t.name} ({inspect(t).identity_token})" for t in last)
        print(f"last five tenants: {shown}")
        assert [t.id for t in last] == sorted(TENANTS, reverse=True)[:5]

        # GROUP BY with count, ordered and limited after the partitions' counts are added up
        busiest = session.execute(
            select(Tenant.name, func.count(Task.id).label("open"))
            .join(Task, Task.tenant_id == Tenant.id)
            .where(Task.done.is_(False))
            .group_by(Tenant.name)
            .order_by(func.count(Task.id).desc(), Tenant.name)
            .limit(3)
        ).all()
        print("most open tasks: " + ", ".join(f"{name} {n}" for name, n in busiest))
        assert [tuple(r) for r in busiest] == [("acme", 16), ("aperture", 16), ("globex", 16)]

        # a reference table joins on every partition, since each has a copy
        by_plan = session.execute(
            select(Plan.name, func.count(Tenant.id), func.sum(Plan.monthly_price))
            .join_from(Tenant, Plan)
            .group_by(Plan.name)
            .order_by(Plan.name)
        ).all()
        for plan, tenants, revenue in by_plan:
            print(f"plan {plan:<10} {tenants:>2} tenants, {revenue:>5} per month")
        expected = Counter(plan_of(t) for t in TENANTS)
        prices = {code: (name, price) for code, name, price in PLANS}
        assert [tuple(r) for r in by_plan] == sorted(
            (prices[code][0], n, n * prices[code][1]) for code, n in expected.items()
        )

    # cross-check: the merged count equals the tenants' own counts, read one by one
    per_tenant = 0
    for tenant_id in TENANTS:
        with sharded.pinned(tenant_id), Session() as session:
            own = select(func.count(Task.id)).where(Task.tenant_id == tenant_id)
            per_tenant += session.execute(own).scalar_one()
    print(f"cross-check: the sum of 12 pinned per-tenant counts is {per_tenant} too")
    assert per_tenant == total


def rollback(sharded: ShardedEngine, Session: sessionmaker[ShardedSession]) -> None:
    section("Rollback: a flush on several partitions, then undone everywhere")
    with Session() as session:
        before = session.execute(ALL_TASKS).scalar_one()
        projects = session.scalars(select(Project).where(Project.tenant_id.in_([1, 2, 5, 9])))
        session.add_all([Task(project=p, title="draft") for p in projects])
        session.execute(update(Task).where(Task.tenant_id == 1).values(done=True))
        session.flush()
        during = session.execute(ALL_TASKS).scalar_one()
        session.rollback()
        after = session.execute(ALL_TASKS).scalar_one()
        done = session.execute(ALL_TASKS.where(Task.done.is_(True))).scalar_one()
    print(f"tasks before {before}, after the flush {during}, after the rollback {after}")
    assert during == before + 8
    assert after == before
    assert done == 2  # the two tasks the requests closed; tenant 1's update was rolled back


if __name__ == "__main__":
    with scratch_partitions(4, prefix="partpool_orm_tenants", announce=True) as urls:
        main(urls)
