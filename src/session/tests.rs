//! The rules of PROTOCOL.md §3 on the bare state machine: no sockets, no
//! sleeping; time is an argument.

use std::time::Duration;

use tokio::time::Instant;

use super::registry::*;
use crate::ids::{Capabilities, Capability, OpaqueId, RunId, SessionId};

const TTL: Duration = Duration::from_secs(30);

fn registry() -> SessionRegistry {
    SessionRegistry::new(LeasePolicy {
        lease_ttl: TTL,
        heartbeat_interval: Duration::from_secs(10),
        tombstone_ttl: Duration::from_secs(600),
        max_sessions_per_conn: 3,
        max_runs_per_tenant: u64::MAX,
    })
}

fn run(s: &str) -> RunId {
    RunId::new(s).unwrap()
}

fn params(
    run_id: &str,
    instance: &str,
    reconnect: bool,
    epoch: Option<u64>,
    caps: &[Capability],
) -> AttachParams {
    AttachParams {
        run_id: run(run_id),
        runtime_instance_id: OpaqueId::new(instance).unwrap(),
        attempt_id: None,
        reconnect,
        connection_epoch: epoch,
        capabilities: caps.iter().copied().collect::<Capabilities>(),
        tenant: None,
    }
}

const A: ConnId = ConnId(1);
const B: ConnId = ConnId(2);
const C: ConnId = ConnId(3);

fn attach(reg: &mut SessionRegistry, conn: ConnId, p: AttachParams, now: Instant) -> AttachOutcome {
    reg.attach(conn, p, now).expect("attach should succeed")
}

#[test]
fn fresh_attach_starts_a_session_at_its_epoch() {
    let mut reg = registry();
    let now = Instant::now();
    let out = attach(&mut reg, A, params("r1", "i1", false, Some(4), &[]), now);
    assert!(out.fresh);
    assert_eq!(out.session.epoch, 4);
    assert_eq!(out.session.lease_deadline, now + TTL);
    assert_eq!(reg.run_state(&run("r1")), Some(SessionState::Attached));
    let default_epoch = attach(&mut reg, B, params("r2", "i2", false, None, &[]), now);
    assert_eq!(default_epoch.session.epoch, 0);
    assert_ne!(out.session.session_id, default_epoch.session.session_id);
}

#[test]
fn second_fresh_attach_of_a_live_run_conflicts() {
    let mut reg = registry();
    let now = Instant::now();
    attach(&mut reg, A, params("r1", "i1", false, None, &[]), now);
    let err = reg
        .attach(B, params("r1", "i1", false, None, &[]), now)
        .unwrap_err();
    assert_eq!(err, SessionError::RunTaken { run_id: run("r1") });
}

#[test]
fn reconnect_with_higher_epoch_moves_the_session_and_fences_the_old_socket() {
    let mut reg = registry();
    let now = Instant::now();
    let first = attach(&mut reg, A, params("r1", "i1", false, Some(1), &[]), now);
    let sid = first.session.session_id.clone();
    let later = now + Duration::from_secs(5);
    let moved = attach(&mut reg, B, params("r1", "i1", true, Some(2), &[]), later);
    assert!(!moved.fresh);
    assert_eq!(moved.session.session_id, sid);
    assert_eq!(moved.session.lease_deadline, later + TTL);
    assert_eq!(
        moved.superseded,
        Some(Superseded {
            conn: A,
            session_id: sid.clone(),
            run_id: run("r1"),
            new_epoch: 2
        })
    );
    assert!(reg.authorize(B, &sid, &run("r1")).is_ok());
    assert_eq!(
        reg.authorize(A, &sid, &run("r1")).unwrap_err(),
        SessionError::StaleEpoch {
            session_id: sid.clone(),
            current_epoch: 2
        }
    );
    // A socket that never held it is simply not attached.
    assert_eq!(
        reg.authorize(C, &sid, &run("r1")).unwrap_err(),
        SessionError::NotAttached
    );
}

#[test]
fn reconnect_with_equal_or_lower_epoch_is_fenced() {
    let mut reg = registry();
    let now = Instant::now();
    attach(&mut reg, A, params("r1", "i1", false, Some(3), &[]), now);
    for e in [0, 2, 3] {
        let err = reg
            .attach(B, params("r1", "i1", true, Some(e), &[]), now)
            .unwrap_err();
        assert_eq!(
            err,
            SessionError::EpochNotGreater {
                offered: e,
                current: 3
            }
        );
    }
    // Nothing moved.
    assert_eq!(reg.run_state(&run("r1")), Some(SessionState::Attached));
}

#[test]
fn reconnect_by_another_instance_conflicts_and_unknown_run_is_expired() {
    let mut reg = registry();
    let now = Instant::now();
    attach(&mut reg, A, params("r1", "i1", false, None, &[]), now);
    assert_eq!(
        reg.attach(B, params("r1", "other", true, Some(1), &[]), now)
            .unwrap_err(),
        SessionError::OtherInstance { run_id: run("r1") }
    );
    assert_eq!(
        reg.attach(B, params("nobody", "i1", true, Some(1), &[]), now)
            .unwrap_err(),
        SessionError::Expired {
            run_id: run("nobody")
        }
    );
}

#[test]
fn leases_expire_on_time_and_heartbeats_renew_them() {
    let mut reg = registry();
    let t0 = Instant::now();
    let s = attach(&mut reg, A, params("r1", "i1", false, None, &[]), t0).session;
    assert_eq!(reg.next_deadline(), Some(t0 + TTL));
    let t1 = t0 + Duration::from_secs(20);
    let deadline = reg
        .heartbeat(A, &s.session_id, &s.run_id, None, t1)
        .unwrap();
    assert_eq!(deadline, t1 + TTL);
    // The old deadline passes: nothing expires.
    assert!(reg.expire_due(t0 + TTL + Duration::from_secs(1)).is_empty());
    assert_eq!(reg.next_deadline(), Some(t1 + TTL));
    // The renewed one passes: it expires, exactly once.
    let expired = reg.expire_due(t1 + TTL);
    assert_eq!(
        expired,
        vec![Expired {
            conn: Some(A),
            session_id: s.session_id.clone(),
            run_id: run("r1")
        }]
    );
    assert!(reg.expire_due(t1 + TTL + Duration::from_secs(1)).is_empty());
    assert_eq!(reg.run_state(&run("r1")), Some(SessionState::Expired));
    assert_eq!(
        reg.heartbeat(A, &s.session_id, &s.run_id, None, t1 + TTL)
            .unwrap_err(),
        SessionError::Expired { run_id: run("r1") }
    );
    assert_eq!(
        reg.attach(B, params("r1", "i1", true, Some(5), &[]), t1 + TTL)
            .unwrap_err(),
        SessionError::Expired { run_id: run("r1") }
    );
    // A fresh attach replaces the tombstone.
    let again = attach(&mut reg, B, params("r1", "i1", false, None, &[]), t1 + TTL);
    assert_ne!(again.session.session_id, s.session_id);
}

#[test]
fn tombstones_are_forgotten_after_their_time() {
    let mut reg = registry();
    let t0 = Instant::now();
    attach(&mut reg, A, params("r1", "i1", false, None, &[]), t0);
    reg.expire_due(t0 + TTL);
    assert_eq!(reg.counts().expired, 1);
    reg.expire_due(t0 + TTL + Duration::from_secs(600));
    assert_eq!(reg.counts(), Counts::default());
    assert_eq!(reg.next_deadline(), None);
}

#[test]
fn a_closed_socket_detaches_its_sessions_until_the_lease_ends() {
    let mut reg = registry();
    let t0 = Instant::now();
    let s = attach(&mut reg, A, params("r1", "i1", false, Some(1), &[]), t0).session;
    assert_eq!(reg.connection_closed(A), vec![run("r1")]);
    assert_eq!(reg.run_state(&run("r1")), Some(SessionState::Detached));
    let back = attach(
        &mut reg,
        B,
        params("r1", "i1", true, Some(2), &[]),
        t0 + Duration::from_secs(29),
    );
    assert_eq!(back.session.session_id, s.session_id);
    assert_eq!(
        back.superseded, None,
        "nobody to tell: the old socket is gone"
    );
    assert_eq!(reg.run_state(&run("r1")), Some(SessionState::Attached));
}

#[test]
fn detached_session_expires_with_no_socket_to_tell() {
    let mut reg = registry();
    let t0 = Instant::now();
    attach(&mut reg, A, params("r1", "i1", false, None, &[]), t0);
    reg.connection_closed(A);
    let expired = reg.expire_due(t0 + TTL);
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].conn, None);
}

#[test]
fn sub_runs_need_subtasks_run_on_the_main_session() {
    let mut reg = registry();
    let now = Instant::now();
    attach(&mut reg, A, params("main", "i1", false, None, &[]), now);
    let err = reg
        .attach(A, params("sub", "i1", false, None, &[]), now)
        .unwrap_err();
    assert!(matches!(err, SessionError::Forbidden(_)));

    attach(
        &mut reg,
        B,
        params("main2", "i2", false, None, &[Capability::SubtasksRun]),
        now,
    );
    let sub = attach(&mut reg, B, params("sub2", "i2", false, None, &[]), now);
    assert!(sub.session.is_sub_run);
    // Another instance on the same socket is refused.
    let err = reg
        .attach(B, params("sub3", "other", false, None, &[]), now)
        .unwrap_err();
    assert!(matches!(err, SessionError::Forbidden(_)));
}

struct Family {
    main: SessionView,
    subs: Vec<SessionView>,
}

fn family(reg: &mut SessionRegistry, conn: ConnId, now: Instant) -> Family {
    let main = attach(
        reg,
        conn,
        params("m", "i1", false, Some(1), &[Capability::SubtasksRun]),
        now,
    )
    .session;
    let subs = ["s1", "s2"]
        .iter()
        .map(|r| attach(reg, conn, params(r, "i1", false, Some(1), &[]), now).session)
        .collect();
    Family { main, subs }
}

#[test]
fn recover_moves_every_sub_run_to_the_reattached_main() {
    let mut reg = registry();
    let now = Instant::now();
    let f = family(&mut reg, A, now);
    let main = attach(
        &mut reg,
        B,
        params("m", "i1", true, Some(2), &[Capability::SubtasksRun]),
        now,
    )
    .session;
    assert_eq!(main.session_id, f.main.session_id);
    let moved = reg
        .recover(
            B,
            &main.session_id,
            &main.run_id,
            None,
            Some(2),
            &|_| true,
            now,
        )
        .unwrap();
    assert_eq!(moved.len(), 2);
    assert!(moved.iter().all(|s| s.conn == A && s.new_epoch == 2));
    for sub in &f.subs {
        assert_eq!(
            reg.authorize(B, &sub.session_id, &sub.run_id)
                .unwrap()
                .epoch,
            2
        );
        assert!(matches!(
            reg.authorize(A, &sub.session_id, &sub.run_id),
            Err(SessionError::StaleEpoch { .. })
        ));
    }
}

#[test]
fn recover_is_all_or_nothing() {
    let mut reg = registry();
    let now = Instant::now();
    let f = family(&mut reg, A, now);
    // An unrelated run that is not a sub-run of "m".
    attach(&mut reg, C, params("stranger", "i1", false, None, &[]), now);
    let main = attach(
        &mut reg,
        B,
        params("m", "i1", true, Some(2), &[Capability::SubtasksRun]),
        now,
    )
    .session;
    let list = [run("s1"), run("stranger")];
    let err = reg
        .recover(
            B,
            &main.session_id,
            &main.run_id,
            Some(&list),
            None,
            &|_| true,
            now,
        )
        .unwrap_err();
    assert_eq!(err.run_id, Some(run("stranger")));
    assert!(matches!(err.error, SessionError::Forbidden(_)));
    // s1 did not move.
    assert!(
        reg.authorize(A, &f.subs[0].session_id, &f.subs[0].run_id)
            .is_ok()
    );
    assert_eq!(
        reg.authorize(B, &f.subs[0].session_id, &f.subs[0].run_id)
            .unwrap_err(),
        SessionError::NotAttached
    );

    // An expired sub-run blocks the whole move too.
    let missing = [run("s1"), run("gone")];
    let err = reg
        .recover(
            B,
            &main.session_id,
            &main.run_id,
            Some(&missing),
            None,
            &|_| true,
            now,
        )
        .unwrap_err();
    assert_eq!(err.run_id, Some(run("gone")));
    assert!(
        reg.authorize(A, &f.subs[0].session_id, &f.subs[0].run_id)
            .is_ok()
    );
}

#[test]
fn recover_takes_only_runs_the_socket_may_cover() {
    let mut reg = registry();
    let now = Instant::now();
    let f = family(&mut reg, A, now);
    let main = attach(
        &mut reg,
        B,
        params("m", "i1", true, Some(2), &[Capability::SubtasksRun]),
        now,
    )
    .session;
    let covered = |r: &RunId| r.as_str() == "m" || r.as_str() == "s1";
    // Every sub-run: s2 is not covered, so nothing moves.
    let err = reg
        .recover(B, &main.session_id, &main.run_id, None, None, &covered, now)
        .unwrap_err();
    assert_eq!(err.run_id, Some(run("s2")));
    assert!(matches!(err.error, SessionError::Forbidden(_)));
    assert!(
        reg.authorize(A, &f.subs[0].session_id, &f.subs[0].run_id)
            .is_ok()
    );
    // Named runs are checked before they are looked up: an uncovered run
    // that does not exist is refused exactly like one that does.
    for name in ["s2", "nobody"] {
        let list = [run("s1"), run(name)];
        let err = reg
            .recover(
                B,
                &main.session_id,
                &main.run_id,
                Some(&list),
                None,
                &covered,
                now,
            )
            .unwrap_err();
        assert_eq!(err.run_id, Some(run(name)));
        assert!(matches!(err.error, SessionError::Forbidden(_)));
    }
    // What is covered moves.
    let list = [run("s1")];
    let moved = reg
        .recover(
            B,
            &main.session_id,
            &main.run_id,
            Some(&list),
            None,
            &covered,
            now,
        )
        .unwrap();
    assert_eq!(moved.len(), 1);
}

#[test]
fn recover_refuses_a_wrong_epoch_and_a_foreign_socket() {
    let mut reg = registry();
    let now = Instant::now();
    let f = family(&mut reg, A, now);
    let main = attach(
        &mut reg,
        B,
        params("m", "i1", true, Some(2), &[Capability::SubtasksRun]),
        now,
    )
    .session;
    let err = reg
        .recover(
            B,
            &main.session_id,
            &main.run_id,
            None,
            Some(7),
            &|_| true,
            now,
        )
        .unwrap_err();
    assert_eq!(
        err.error,
        SessionError::EpochNotMain {
            offered: 7,
            current: 2
        }
    );
    let err = reg
        .recover(
            C,
            &main.session_id,
            &main.run_id,
            None,
            None,
            &|_| true,
            now,
        )
        .unwrap_err();
    assert_eq!(err.error, SessionError::NotAttached);
    assert!(
        reg.authorize(A, &f.subs[1].session_id, &f.subs[1].run_id)
            .is_ok()
    );
}

#[test]
fn authorize_checks_the_run_too() {
    let mut reg = registry();
    let now = Instant::now();
    let s = attach(&mut reg, A, params("r1", "i1", false, None, &[]), now).session;
    assert_eq!(
        reg.authorize(A, &s.session_id, &run("r2")).unwrap_err(),
        SessionError::NotAttached
    );
    assert_eq!(
        reg.authorize(A, &SessionId::generate(), &run("r1"))
            .unwrap_err(),
        SessionError::NotAttached
    );
}

#[test]
fn heartbeat_with_another_instance_is_refused() {
    let mut reg = registry();
    let now = Instant::now();
    let s = attach(&mut reg, A, params("r1", "i1", false, None, &[]), now).session;
    let other = OpaqueId::new("i2").unwrap();
    assert_eq!(
        reg.heartbeat(A, &s.session_id, &s.run_id, Some(&other), now)
            .unwrap_err(),
        SessionError::OtherInstance { run_id: run("r1") }
    );
}

// ------------------------------------------------- keeping sessions (restart)

use crate::store::{SessionChange, SessionRecord};
use crate::time::Clock;

fn puts(changes: Vec<SessionChange>) -> Vec<SessionRecord> {
    let mut records: Vec<SessionRecord> = changes
        .into_iter()
        .map(|c| match c {
            SessionChange::Put(r) => r,
            SessionChange::Delete(id) => panic!("unexpected delete of {id:?}"),
        })
        .collect();
    records.sort_by(|a, b| a.run_id.cmp(&b.run_id));
    records
}

/// The clock of a process started now, on a machine whose wall clock moved
/// with (paused) tokio time.
fn restarted(clock: &Clock) -> Clock {
    let now = Instant::now();
    Clock::anchored(now, clock.wall(now))
}

#[tokio::test(start_paused = true)]
async fn changes_are_taken_once_and_heartbeats_are_renewals_only() {
    let clock = Clock::start();
    let mut reg = registry();
    let now = clock.now();
    let s = attach(&mut reg, A, params("r1", "i1", false, Some(3), &[]), now).session;
    let saved = puts(reg.take_changes(&clock));
    assert_eq!(saved.len(), 1);
    assert_eq!(saved[0].session_id, s.session_id);
    assert_eq!(saved[0].epoch, 3);
    assert!(!saved[0].expired);
    assert_eq!(
        saved[0].deadline_unix_ms,
        clock.wall(now + TTL).unix_millis()
    );
    assert!(reg.take_changes(&clock).is_empty(), "taken twice");

    // A renewal that moves the deadline less than a lease past the saved
    // one is not written (a restore adds that much slack)...
    let sooner = now + Duration::from_secs(10);
    reg.heartbeat(A, &s.session_id, &s.run_id, None, sooner)
        .unwrap();
    assert!(
        reg.take_changes(&clock).is_empty(),
        "a heartbeat is no change"
    );
    assert!(!reg.has_renewals(), "within a lease of the saved deadline");
    // ... one that moves it further is.
    let later = now + TTL + Duration::from_millis(1);
    assert!(later < sooner + TTL, "still within the lease");
    reg.heartbeat(A, &s.session_id, &s.run_id, None, later)
        .unwrap();
    assert!(reg.take_changes(&clock).is_empty());
    let renewed = puts(reg.take_renewals(&clock, usize::MAX));
    assert_eq!(
        renewed[0].deadline_unix_ms,
        clock.wall(later + TTL).unix_millis()
    );
    assert!(reg.take_renewals(&clock, usize::MAX).is_empty());

    // A reconnect is a change (new epoch); expiry too; forgetting deletes.
    attach(&mut reg, B, params("r1", "i1", true, Some(4), &[]), later);
    assert_eq!(puts(reg.take_changes(&clock))[0].epoch, 4);
    let expired_at = later + TTL;
    assert_eq!(reg.expire_due(expired_at).len(), 1);
    assert!(puts(reg.take_changes(&clock))[0].expired);
    reg.expire_due(expired_at + Duration::from_secs(600));
    assert_eq!(
        reg.take_changes(&clock),
        vec![SessionChange::Delete(s.session_id.clone())]
    );
}

#[tokio::test(start_paused = true)]
async fn restored_sessions_keep_their_id_epoch_and_fencing() {
    let clock = Clock::start();
    let now = clock.now();
    let mut before = registry();
    let f = family(&mut before, A, now);
    let records = puts(before.take_changes(&clock));
    assert_eq!(records.len(), 3);

    // A new process: its own clock, a few seconds later.
    tokio::time::advance(Duration::from_secs(5)).await;
    let clock2 = restarted(&clock);
    let mut after = registry();
    let restored = after.restore(records, &clock2, Duration::from_secs(2));
    assert_eq!(restored.live.len(), 3);
    assert_eq!(restored.dropped, 0);
    assert_eq!(after.run_state(&run("m")), Some(SessionState::Detached));
    let now2 = clock2.now();
    assert!(after.expire_due(now2).is_empty());

    // The saved epoch still fences: not greater is refused...
    let err = after
        .attach(
            B,
            params("m", "i1", true, Some(1), &[Capability::SubtasksRun]),
            now2,
        )
        .unwrap_err();
    assert_eq!(
        err,
        SessionError::EpochNotGreater {
            offered: 1,
            current: 1
        }
    );
    // ...another instance is refused, a fresh attach is refused...
    assert!(matches!(
        after.attach(B, params("m", "i2", true, Some(9), &[]), now2),
        Err(SessionError::OtherInstance { .. })
    ));
    assert!(matches!(
        after.attach(B, params("m", "i1", false, Some(9), &[]), now2),
        Err(SessionError::RunTaken { .. })
    ));
    // ...and a higher epoch gets the same session, capabilities and sub-runs.
    let main = attach(
        &mut after,
        B,
        params("m", "i1", true, Some(2), &[Capability::SubtasksRun]),
        now2,
    )
    .session;
    assert_eq!(main.session_id, f.main.session_id);
    assert!(main.capabilities.contains(Capability::SubtasksRun));
    let moved = after
        .recover(
            B,
            &main.session_id,
            &main.run_id,
            None,
            Some(2),
            &|_| true,
            now2,
        )
        .unwrap();
    assert!(moved.is_empty(), "nobody held the sub-runs to be told");
    for sub in &f.subs {
        assert_eq!(
            after
                .authorize(B, &sub.session_id, &sub.run_id)
                .unwrap()
                .epoch,
            2
        );
    }
}

#[tokio::test(start_paused = true)]
async fn leases_that_ran_out_while_down_expire_on_restore() {
    let clock = Clock::start();
    let now = clock.now();
    let mut before = registry();
    let s = attach(&mut before, A, params("r1", "i1", false, Some(1), &[]), now).session;
    let mut records = puts(before.take_changes(&clock));
    // An older tombstone, saved as such, is restored as one.
    let mut tomb = records[0].clone();
    tomb.session_id = SessionId::generate();
    tomb.run_id = run("r0");
    tomb.expired = true;
    tomb.deadline_unix_ms = clock.wall(now + Duration::from_secs(3600)).unix_millis();
    records.push(tomb);

    // Down for longer than the lease plus the slack.
    tokio::time::advance(TTL + Duration::from_secs(3)).await;
    let clock2 = restarted(&clock);
    let mut after = registry();
    let restored = after.restore(records, &clock2, Duration::from_secs(2));
    assert_eq!(restored.live, vec![run("r1")]);
    let expired = after.expire_due(clock2.now());
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].session_id, s.session_id);
    assert_eq!(expired[0].conn, None);
    assert!(matches!(
        after.attach(B, params("r1", "i1", true, Some(2), &[]), clock2.now()),
        Err(SessionError::Expired { .. })
    ));
    assert!(matches!(
        after.attach(B, params("r0", "i1", true, Some(2), &[]), clock2.now()),
        Err(SessionError::Expired { .. })
    ));
    // Expired sessions are saved as tombstones; a fresh attach takes the run.
    let changes = puts(after.take_changes(&clock2));
    assert!(changes.iter().all(|r| r.expired));
    let fresh = attach(
        &mut after,
        B,
        params("r1", "i1", false, Some(2), &[]),
        clock2.now(),
    );
    assert_ne!(fresh.session.session_id, s.session_id);
}

#[tokio::test(start_paused = true)]
async fn restore_keeps_one_session_per_run() {
    let clock = Clock::start();
    let mut before = registry();
    attach(
        &mut before,
        A,
        params("r1", "i1", false, Some(1), &[]),
        clock.now(),
    );
    let live = puts(before.take_changes(&clock)).remove(0);
    let mut stale = live.clone();
    stale.session_id = SessionId::generate();
    stale.expired = true;
    let mut after = registry();
    let restored = after.restore(vec![stale.clone(), live.clone()], &clock, Duration::ZERO);
    assert_eq!(restored.live, vec![run("r1")]);
    assert_eq!(restored.dropped, 1);
    assert_eq!(
        after.take_changes(&clock),
        vec![SessionChange::Delete(stale.session_id)]
    );
    assert_eq!(after.run_state(&run("r1")), Some(SessionState::Detached));
}

#[test]
fn an_abandoned_fresh_session_frees_its_run() {
    let mut reg = registry();
    let now = Instant::now();
    let s = attach(&mut reg, A, params("r1", "i1", false, None, &[]), now).session;
    reg.abandon(&s.session_id);
    assert_eq!(reg.run_state(&run("r1")), None);
    attach(&mut reg, A, params("r1", "i1", false, None, &[]), now);
}

#[test]
fn a_socket_holds_at_most_its_maximum_of_sessions() {
    let mut reg = registry();
    let t0 = Instant::now();
    let main = attach(
        &mut reg,
        A,
        params("m", "i", false, None, &[Capability::SubtasksRun]),
        t0,
    );
    attach(&mut reg, A, params("s1", "i", false, None, &[]), t0);
    attach(&mut reg, A, params("s2", "i", false, None, &[]), t0);
    assert_eq!(reg.sessions_on(A), 3);
    let err = reg
        .attach(A, params("s3", "i", false, None, &[]), t0)
        .unwrap_err();
    assert_eq!(err, SessionError::TooManySessions { max: 3 });
    assert_eq!(reg.run_state(&run("s3")), None, "nothing was created");
    // Another socket is not affected.
    attach(&mut reg, B, params("other", "j", false, None, &[]), t0);
    // Moving the sessions to a new socket: the main reattaches, then
    // recovery moves both sub-runs (3 in all: fits).
    let re = reg
        .attach(
            C,
            params("m", "i", true, Some(1), &[Capability::SubtasksRun]),
            t0,
        )
        .unwrap();
    assert_eq!(re.session.session_id, main.session.session_id);
    reg.recover(
        C,
        &main.session.session_id,
        &run("m"),
        None,
        Some(1),
        &|_| true,
        t0,
    )
    .unwrap();
    assert_eq!(reg.sessions_on(C), 3);
    assert_eq!(reg.sessions_on(A), 0);
}

#[test]
fn recovery_that_would_overfill_a_socket_moves_nothing() {
    let mut reg = registry();
    let t0 = Instant::now();
    let main = attach(
        &mut reg,
        A,
        params("m", "i", false, None, &[Capability::SubtasksRun]),
        t0,
    );
    attach(&mut reg, A, params("s1", "i", false, None, &[]), t0);
    attach(&mut reg, A, params("s2", "i", false, None, &[]), t0);
    reg.attach(
        C,
        params("m", "i", true, Some(1), &[Capability::SubtasksRun]),
        t0,
    )
    .unwrap();
    // A fresh sub-run on the new socket first: 2 bound, 2 more would be 4.
    attach(&mut reg, C, params("s3", "i", false, None, &[]), t0);
    let err = reg
        .recover(
            C,
            &main.session.session_id,
            &run("m"),
            None,
            Some(1),
            &|_| true,
            t0,
        )
        .unwrap_err();
    assert_eq!(err.error, SessionError::TooManySessions { max: 3 });
    assert_eq!(err.run_id, None);
    assert_eq!(reg.sessions_on(C), 2);
    assert_eq!(reg.sessions_on(A), 2, "the sub-runs stayed where they were");
}

/// However heartbeats fall, once the upkeep has taken the renewals (once a
/// second) the last saved deadline plus the slack a restore adds is never
/// earlier than the deadline the runtime was last promised: skipping the
/// renewals that move the deadline less than a lease costs a restored
/// lease nothing. (A heartbeat answered in the second before a crash is
/// covered only by the slack, as before any thinning.)
#[tokio::test(start_paused = true)]
async fn a_saved_deadline_plus_the_restore_slack_covers_every_promise() {
    let clock = Clock::start();
    let mut reg = registry();
    let start = clock.now();
    let s = attach(&mut reg, A, params("r1", "i1", false, None, &[]), start).session;
    let slack = reg.policy().saved_deadline_slack();
    let interval = reg.policy().heartbeat_interval;
    let mut saved = puts(reg.take_changes(&clock))[0].deadline_unix_ms;
    let mut promised = saved;
    let (mut writes, mut beats) = (1, 0);
    // Heartbeats at the interval, up to 0.6 s early; the upkeep takes
    // renewals once a second.
    let mut next_save = start + super::RENEWALS_SAVED_EVERY;
    let mut at = start;
    for i in 0..200u32 {
        at += interval - Duration::from_millis(u64::from(i % 7) * 100);
        while next_save <= at {
            for r in puts(reg.take_renewals(&clock, usize::MAX)) {
                saved = r.deadline_unix_ms;
                writes += 1;
            }
            assert!(
                saved + slack.as_millis() as u64 >= promised,
                "beat {i}: saved {saved} + slack {slack:?} < promised {promised}"
            );
            next_save += super::RENEWALS_SAVED_EVERY;
        }
        let deadline = reg
            .heartbeat(A, &s.session_id, &s.run_id, None, at)
            .unwrap();
        beats += 1;
        promised = clock.wall(deadline).unix_millis();
    }
    assert!(
        writes * 3 <= beats,
        "{writes} writes for {beats} heartbeats: renewals are not thinned"
    );
}

#[tokio::test(start_paused = true)]
async fn renewals_are_taken_in_slices() {
    let clock = Clock::start();
    let mut reg = registry();
    let now = clock.now();
    let mut sessions = Vec::new();
    for (i, conn) in [A, B, C].into_iter().enumerate() {
        let p = params(&format!("r{i}"), "i1", false, None, &[]);
        sessions.push((conn, attach(&mut reg, conn, p, now).session));
    }
    // Saving a change saves the deadline too: nothing is left to renew.
    reg.take_changes(&clock);
    assert!(!reg.has_renewals());
    // Renewals worth saving: more than a lease past the saved deadline.
    for at in [now + TTL / 2, now + TTL * 3 / 2] {
        for (conn, s) in &sessions {
            reg.heartbeat(*conn, &s.session_id, &s.run_id, None, at)
                .unwrap();
        }
    }
    let mut taken = 0;
    while reg.has_renewals() {
        let slice = reg.take_renewals(&clock, 2);
        assert!(!slice.is_empty() && slice.len() <= 2);
        taken += slice.len();
    }
    assert_eq!(taken, 3);
    assert!(reg.take_renewals(&clock, 2).is_empty());
}

// ------------------------------------- sessions shared with other gateways

/// Two registries standing for two gateways on one shared store: the
/// record one saves is what the other adopts.
#[tokio::test(start_paused = true)]
async fn a_session_held_elsewhere_fences_here_and_never_expires_here() {
    let clock = Clock::start();
    let now = clock.now();
    let (mut here, mut there) = (registry(), registry());
    let s = attach(&mut here, A, params("r1", "i1", false, Some(1), &[]), now).session;
    let record = puts(here.take_changes(&clock)).remove(0);

    // There: the run is taken, so a fresh attach conflicts; a reconnect at
    // a higher epoch takes it over with the same id.
    assert!(
        there
            .adopt(record.clone(), false, &clock, Duration::ZERO, now)
            .is_empty()
    );
    assert_eq!(
        there
            .attach(C, params("r1", "i1", false, None, &[]), now)
            .unwrap_err(),
        SessionError::RunTaken { run_id: run("r1") }
    );
    assert_eq!(
        there
            .attach(C, params("r1", "i1", true, Some(1), &[]), now)
            .unwrap_err(),
        SessionError::EpochNotGreater {
            offered: 1,
            current: 1
        }
    );
    assert_eq!(
        there.counts(),
        Counts::default(),
        "not counted where it is not held"
    );
    let moved = attach(&mut there, C, params("r1", "i1", true, Some(2), &[]), now);
    assert_eq!(moved.session.session_id, s.session_id);
    assert!(moved.superseded.is_none(), "no socket here held it");
    assert_eq!(puts(there.take_changes(&clock))[0].epoch, 2);

    // Here: told of the move, the socket loses it and is fenced.
    let lost = here.lose(&s.session_id, 2, now).expect("A held it");
    assert_eq!((lost.conn, lost.new_epoch), (A, 2));
    assert_eq!(
        here.heartbeat(A, &s.session_id, &s.run_id, None, now)
            .unwrap_err(),
        SessionError::StaleEpoch {
            session_id: s.session_id.clone(),
            current_epoch: 2
        }
    );
    assert!(
        here.lose(&s.session_id, 2, now).is_none(),
        "told twice, lost once"
    );
    assert!(
        here.take_changes(&clock).is_empty(),
        "nothing to save from here"
    );
    assert!(here.take_renewals(&clock, usize::MAX).is_empty());

    // Its lease runs there only: here it is quietly forgotten later.
    let long_after = now + TTL + Duration::from_secs(601);
    assert!(here.expire_due(long_after).is_empty(), "no expiry here");
    assert_eq!(here.run_state(&run("r1")), None);
    assert!(
        here.take_changes(&clock).is_empty(),
        "forgetting it saves nothing"
    );
    assert_eq!(there.expire_due(now + TTL).len(), 1, "expires there, once");
}

/// A session taken over from a gateway that stopped is held here: its
/// lease runs here from the saved deadline (plus slack), and a fresh copy
/// held elsewhere gives way to it.
#[tokio::test(start_paused = true)]
async fn a_session_taken_over_from_a_stopped_gateway_runs_its_lease_here() {
    let clock = Clock::start();
    let now = clock.now();
    let mut gone = registry();
    let s = attach(&mut gone, A, params("r1", "i1", false, Some(5), &[]), now).session;
    let record = puts(gone.take_changes(&clock)).remove(0);

    let mut here = registry();
    here.adopt(record.clone(), false, &clock, Duration::ZERO, now);
    here.adopt(record.clone(), true, &clock, Duration::from_secs(2), now);
    assert_eq!(here.run_state(&run("r1")), Some(SessionState::Detached));
    assert_eq!(
        puts(here.take_changes(&clock))[0].session_id,
        s.session_id,
        "saved as held here"
    );
    assert!(
        here.expire_due(now + TTL + Duration::from_secs(1))
            .is_empty(),
        "slack"
    );
    let expired = here.expire_due(now + TTL + Duration::from_secs(2));
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].conn, None);

    // A record older than what this gateway holds changes nothing.
    let mut fresh = registry();
    let mine = attach(&mut fresh, B, params("r2", "i1", false, Some(3), &[]), now).session;
    let mut stale = puts(fresh.take_changes(&clock)).remove(0);
    stale.epoch = 2;
    assert!(
        fresh
            .adopt(stale, false, &clock, Duration::ZERO, now)
            .is_empty()
    );
    assert!(
        fresh
            .heartbeat(B, &mine.session_id, &mine.run_id, None, now)
            .is_ok()
    );
}
