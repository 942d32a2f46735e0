//! Unit tests of the HA rules, one situation each.

use super::*;
use jai_proto::{DynamicConfig, LeaderStatus, Lsn, MemberRole, MemberStatus, Tags};
use std::time::Duration;

const NOW: Millis = 100_000;
const WALL: u64 = 1_800_000_000;

fn identity(name: &str) -> Identity {
    Identity {
        name: name.into(),
        cluster: "votes".into(),
        tags: Tags::default(),
        fallback_demote_margin: Duration::from_secs(2),
        reclone_on_rewind_failure: false,
    }
}

fn valid_lease() -> LeaseView {
    LeaseView {
        valid_until: Some(NOW + 5_000),
    }
}

fn cluster() -> ClusterView {
    ClusterView {
        initialize: Some(Initialize::Done {
            system_id: "42".into(),
        }),
        leader: None,
        members: vec![],
        config: DynamicConfig::default(),
        last_leader: None,
        switchover: None,
        sync: None,
        restore: None,
    }
}

fn data_dir(was_primary: bool) -> DataDir {
    DataDir::Initialized {
        system_id: "42".into(),
        was_primary,
    }
}

fn replica_at(lsn: u64) -> RunningPostgres {
    RunningPostgres {
        role: PgRole::Replica,
        timeline: 1,
        write_lsn: None,
        receive_lsn: Some(Lsn(lsn)),
        replay_lsn: Some(Lsn(lsn)),
        following: None,
        slots: vec![],
        standbys: vec![],
        sync_names: SyncNames::Off,
        streaming: true,
    }
}

fn primary_at(lsn: u64) -> RunningPostgres {
    RunningPostgres {
        role: PgRole::Primary,
        timeline: 1,
        write_lsn: Some(Lsn(lsn)),
        receive_lsn: None,
        replay_lsn: None,
        following: None,
        slots: vec![],
        standbys: vec![],
        sync_names: SyncNames::Off,
        streaming: false,
    }
}

fn member(name: &str, role: MemberRole, lsn: u64) -> MemberStatus {
    MemberStatus {
        name: name.into(),
        role,
        state: MemberState::Running,
        reason: None,
        api_url: String::new(),
        pg_address: String::new(),
        pg_paths: None,
        grpc_url: None,
        system_id: Some("42".into()),
        timeline: Some(1),
        write_lsn: (role == MemberRole::Primary).then_some(Lsn(lsn)),
        receive_lsn: (role == MemberRole::Replica).then_some(Lsn(lsn)),
        replay_lsn: (role == MemberRole::Replica).then_some(Lsn(lsn)),
        tags: Tags::default(),
        standing_down: false,
        streaming: None,
        standbys: vec![],
        version: "test".into(),
    }
}

fn leader(name: &str, mine: bool) -> Option<LeaderKey> {
    Some(LeaderKey {
        name: name.into(),
        term: 7,
        mine,
    })
}

fn observe(process: PgProcess, data: DataDir, dcs: Option<ClusterView>) -> Observation {
    Observation {
        now: NOW,
        wall_clock_unix: WALL,
        pg: LocalPostgres {
            data_dir: data,
            process,
            last_rewind: None,
        },
        dcs,
        lease: valid_lease(),
    }
}

fn decide(name: &str, observation: &Observation) -> Decision {
    Core::new(identity(name)).decide(observation)
}

#[test]
fn an_empty_cluster_starts_the_bootstrap_race() {
    let mut view = cluster();
    view.initialize = None;
    let decision = decide(
        "a",
        &observe(PgProcess::Stopped, DataDir::Empty, Some(view)),
    );
    assert_eq!(decision.actions, vec![Action::ClaimInitialize]);
}

#[test]
fn the_race_winner_runs_initdb_then_starts_a_primary_then_takes_the_key() {
    let mut view = cluster();
    view.initialize = Some(Initialize::InProgress { mine: true });
    let decision = decide(
        "a",
        &observe(PgProcess::Stopped, DataDir::Empty, Some(view.clone())),
    );
    assert_eq!(decision.actions, vec![Action::InitDb]);

    let decision = decide(
        "a",
        &observe(PgProcess::Stopped, data_dir(true), Some(view.clone())),
    );
    assert_eq!(decision.actions, vec![Action::Start(StartAs::Primary)]);

    let running = PgProcess::Running(primary_at(100));
    let decision = decide(
        "a",
        &observe(running.clone(), data_dir(true), Some(view.clone())),
    );
    assert_eq!(decision.actions, vec![Action::AcquireLeader]);

    view.leader = leader("a", true);
    let decision = decide("a", &observe(running, data_dir(true), Some(view)));
    assert_eq!(
        decision.actions[0],
        Action::PublishSystemId("42".into()),
        "{decision:?}"
    );
}

#[test]
fn race_losers_wait_then_clone_from_a_running_leader() {
    let mut view = cluster();
    view.initialize = Some(Initialize::InProgress { mine: false });
    let decision = decide(
        "b",
        &observe(PgProcess::Stopped, DataDir::Empty, Some(view.clone())),
    );
    assert!(decision.actions.is_empty());
    assert_eq!(decision.state, MemberState::Waiting);

    view.initialize = Some(Initialize::Done {
        system_id: "42".into(),
    });
    view.leader = leader("a", false);
    let decision = decide(
        "b",
        &observe(PgProcess::Stopped, DataDir::Empty, Some(view.clone())),
    );
    assert!(decision.actions.is_empty(), "leader not running yet");

    view.members = vec![member("a", MemberRole::Primary, 100)];
    let decision = decide(
        "b",
        &observe(PgProcess::Stopped, DataDir::Empty, Some(view)),
    );
    assert_eq!(decision.actions, vec![Action::CloneFrom("a".into())]);
}

#[test]
fn a_foreign_data_directory_is_refused() {
    let data = DataDir::Initialized {
        system_id: "99".into(),
        was_primary: false,
    };
    let decision = decide("b", &observe(PgProcess::Stopped, data, Some(cluster())));
    assert!(decision.actions.is_empty());
    assert_eq!(decision.state, MemberState::Refused);
    assert!(decision.reason.unwrap().contains("system 99"));
}

#[test]
fn a_stopped_replica_starts_following_the_leader() {
    let mut view = cluster();
    view.leader = leader("a", false);
    let decision = decide(
        "b",
        &observe(PgProcess::Stopped, data_dir(false), Some(view)),
    );
    assert_eq!(
        decision.actions,
        vec![Action::Start(StartAs::Replica {
            follow: Some("a".into())
        })]
    );
}

#[test]
fn a_replica_repoints_to_a_new_leader() {
    let mut view = cluster();
    view.leader = leader("c", false);
    let mut pg = replica_at(100);
    pg.following = Some("a".into());
    let decision = decide(
        "b",
        &observe(PgProcess::Running(pg), data_dir(false), Some(view)),
    );
    assert_eq!(decision.actions, vec![Action::Follow(Some("c".into()))]);
}

#[test]
fn the_leader_keeps_a_slot_per_member_and_drops_stale_ones() {
    let mut view = cluster();
    view.leader = leader("a", true);
    view.members = vec![
        member("a", MemberRole::Primary, 100),
        member("b-2", MemberRole::Replica, 100),
    ];
    let mut pg = primary_at(100);
    pg.slots = vec!["jai_gone".into(), "other_tool".into()];
    let decision = decide(
        "a",
        &observe(PgProcess::Running(pg), data_dir(true), Some(view)),
    );
    assert!(decision
        .actions
        .contains(&Action::CreateSlot("jai_b_2".into())));
    assert!(decision
        .actions
        .contains(&Action::DropSlot("jai_gone".into())));
    assert!(!decision
        .actions
        .contains(&Action::DropSlot("other_tool".into())));
}

#[test]
fn a_primary_whose_lease_is_about_to_expire_demotes() {
    let mut view = cluster();
    view.leader = leader("a", true);
    let mut observation = observe(
        PgProcess::Running(primary_at(100)),
        data_dir(true),
        Some(view),
    );
    // Valid for 0.4 s more, but the margin is 0.5 s.
    observation.lease.valid_until = Some(NOW + 400);
    let decision = decide("a", &observation);
    assert!(
        matches!(decision.actions[..], [Action::Stop { .. }]),
        "{decision:?}"
    );
}

#[test]
fn a_primary_cut_off_from_etcd_keeps_serving_while_its_lease_is_valid() {
    let observation = observe(PgProcess::Running(primary_at(100)), data_dir(true), None);
    let decision = decide("a", &observation);
    assert!(decision.actions.is_empty(), "{decision:?}");

    let mut expired = observation;
    expired.lease.valid_until = Some(NOW + 1_000);
    let decision = decide("a", &expired);
    assert!(
        matches!(decision.actions[..], [Action::Stop { .. }]),
        "{decision:?}"
    );
}

#[test]
fn a_primary_that_sees_another_leader_demotes() {
    let mut view = cluster();
    view.leader = leader("b", false);
    let decision = decide(
        "a",
        &observe(
            PgProcess::Running(primary_at(100)),
            data_dir(true),
            Some(view),
        ),
    );
    assert!(
        matches!(decision.actions[..], [Action::Stop { .. }]),
        "{decision:?}"
    );
}

#[test]
fn a_primary_that_lost_its_key_reclaims_it_only_if_nobody_led_since() {
    let mut view = cluster();
    view.last_leader = Some(LeaderStatus {
        leader: "a".into(),
        timeline: 1,
        optime: Lsn(100),
        clean_stop: false,
    });
    let running = PgProcess::Running(primary_at(100));
    let decision = decide(
        "a",
        &observe(running.clone(), data_dir(true), Some(view.clone())),
    );
    assert_eq!(decision.actions, vec![Action::AcquireLeader]);

    view.last_leader.as_mut().unwrap().leader = "b".into();
    let decision = decide("a", &observe(running, data_dir(true), Some(view)));
    assert!(
        matches!(decision.actions[..], [Action::Stop { .. }]),
        "{decision:?}"
    );
}

#[test]
fn the_key_holder_promotes_its_replica() {
    let mut view = cluster();
    view.leader = leader("b", true);
    let decision = decide(
        "b",
        &observe(
            PgProcess::Running(replica_at(100)),
            data_dir(false),
            Some(view),
        ),
    );
    assert!(
        matches!(decision.actions[..], [Action::Promote { .. }]),
        "{decision:?}"
    );
}

#[test]
fn only_the_most_advanced_replica_races() {
    let mut view = cluster();
    view.members = vec![
        member("b", MemberRole::Replica, 100),
        member("c", MemberRole::Replica, 200),
    ];
    let b = decide(
        "b",
        &observe(
            PgProcess::Running(replica_at(100)),
            data_dir(false),
            Some(view.clone()),
        ),
    );
    assert!(b.actions.is_empty(), "{b:?}");
    assert!(b.reason.unwrap().contains("c is a better candidate"));
    let c = decide(
        "c",
        &observe(
            PgProcess::Running(replica_at(200)),
            data_dir(false),
            Some(view),
        ),
    );
    assert_eq!(c.actions, vec![Action::AcquireLeader]);
}

#[test]
fn ties_go_to_the_former_leader_then_priority_then_name() {
    let mut view = cluster();
    view.members = vec![
        member("a", MemberRole::Replica, 100),
        member("b", MemberRole::Replica, 100),
    ];
    let races = |name: &str, view: &ClusterView| {
        !decide(
            name,
            &observe(
                PgProcess::Running(replica_at(100)),
                data_dir(false),
                Some(view.clone()),
            ),
        )
        .actions
        .is_empty()
    };
    assert!(
        races("a", &view) && !races("b", &view),
        "name breaks the tie"
    );

    view.last_leader = Some(LeaderStatus {
        leader: "b".into(),
        timeline: 1,
        optime: Lsn(100),
        clean_stop: false,
    });
    assert!(
        !races("a", &view) && races("b", &view),
        "former leader first"
    );
}

#[test]
fn nofailover_never_races() {
    let mut core = Core::new(Identity {
        tags: Tags {
            nofailover: true,
            ..Tags::default()
        },
        ..identity("b")
    });
    let decision = core.decide(&observe(
        PgProcess::Running(replica_at(100)),
        data_dir(false),
        Some(cluster()),
    ));
    assert!(decision.actions.is_empty());
    assert!(decision.reason.unwrap().contains("nofailover"));
}

#[test]
fn a_replica_too_far_behind_does_not_race() {
    let mut view = cluster();
    view.last_leader = Some(LeaderStatus {
        leader: "a".into(),
        timeline: 1,
        optime: Lsn(10_000_000),
        clean_stop: false,
    });
    view.members = vec![member("a", MemberRole::Replica, 50)];
    let decision = decide(
        "b",
        &observe(
            PgProcess::Running(replica_at(100)),
            data_dir(false),
            Some(view),
        ),
    );
    assert!(decision.actions.is_empty());
    assert!(decision.reason.unwrap().contains("maximum_lag_on_failover"));
}

#[test]
fn no_race_while_another_member_reports_a_running_primary() {
    let mut view = cluster();
    view.members = vec![member("a", MemberRole::Primary, 100)];
    let decision = decide(
        "b",
        &observe(
            PgProcess::Running(replica_at(100)),
            data_dir(false),
            Some(view),
        ),
    );
    assert!(decision.actions.is_empty(), "{decision:?}");
}

#[test]
fn a_crashed_primary_restarts_in_place_until_primary_start_timeout() {
    let mut view = cluster();
    view.leader = leader("a", true);
    view.config.primary_start_timeout = Duration::from_secs(10);
    let mut core = Core::new(identity("a"));
    let mut observation = observe(PgProcess::Stopped, data_dir(true), Some(view));
    assert_eq!(
        core.decide(&observation).actions,
        vec![Action::Start(StartAs::Primary)]
    );
    observation.now += 9_000;
    observation.lease.valid_until = Some(observation.now + 5_000);
    assert_eq!(
        core.decide(&observation).actions,
        vec![Action::Start(StartAs::Primary)]
    );
    observation.now += 1_000;
    observation.lease.valid_until = Some(observation.now + 5_000);
    assert_eq!(
        core.decide(&observation).actions,
        vec![Action::ReleaseLeader]
    );
}

#[test]
fn nothing_happens_while_etcd_is_unreachable() {
    let decision = decide(
        "b",
        &observe(PgProcess::Running(replica_at(100)), data_dir(false), None),
    );
    assert!(decision.actions.is_empty());
    assert!(decision.reason.unwrap().contains("etcd unreachable"));
}

#[test]
#[should_panic(expected = "safety violation")]
fn the_safety_check_catches_a_promotion_without_the_key() {
    let observation = observe(
        PgProcess::Running(replica_at(1)),
        data_dir(false),
        Some(cluster()),
    );
    let decision = Decision::act(
        MemberState::Running,
        None::<String>,
        vec![Action::Promote {
            reason: "bug".into(),
        }],
    );
    assert_safe(&identity("b"), &observation, &decision);
}

#[test]
fn after_a_restart_replicas_give_the_former_leader_time_to_return() {
    let mut view = cluster();
    view.last_leader = Some(LeaderStatus {
        leader: "a".into(),
        timeline: 1,
        optime: Lsn(100),
        clean_stop: false,
    });
    let mut core = Core::new(identity("b"));
    let mut observation = observe(
        PgProcess::Running(replica_at(100)),
        data_dir(false),
        Some(view.clone()),
    );
    assert!(
        core.decide(&observation).actions.is_empty(),
        "a is not back yet"
    );

    view.members = vec![member("a", MemberRole::Replica, 100)];
    observation.dcs = Some(view.clone());
    let decision = core.decide(&observation);
    assert!(
        decision.actions.is_empty(),
        "a is back and wins the tie: {decision:?}"
    );

    view.members.clear();
    observation.dcs = Some(view);
    observation.now += 5_000;
    observation.lease.valid_until = Some(observation.now + 5_000);
    assert_eq!(
        core.decide(&observation).actions,
        vec![Action::AcquireLeader],
        "grace is over"
    );
}

#[test]
fn a_key_holder_without_a_confirmed_lease_does_not_become_writable() {
    let mut view = cluster();
    view.leader = leader("b", true);
    let mut observation = observe(
        PgProcess::Running(replica_at(100)),
        data_dir(false),
        Some(view.clone()),
    );
    observation.lease.valid_until = Some(NOW + 500);
    let decision = decide("b", &observation);
    assert!(decision.actions.is_empty(), "no promotion: {decision:?}");

    let mut stopped = observe(PgProcess::Stopped, data_dir(true), Some(view));
    stopped.lease.valid_until = Some(NOW + 500);
    let decision = decide("b", &stopped);
    assert!(
        decision.actions.is_empty(),
        "no start as primary: {decision:?}"
    );
}

#[test]
fn after_etcd_loses_the_cluster_only_a_former_primary_reregisters_it() {
    let mut view = cluster();
    view.initialize = None;
    let primary = decide(
        "a",
        &observe(PgProcess::Stopped, data_dir(true), Some(view.clone())),
    );
    assert_eq!(primary.actions, vec![Action::ClaimInitialize]);
    let replica = decide(
        "b",
        &observe(PgProcess::Stopped, data_dir(false), Some(view)),
    );
    assert!(replica.actions.is_empty(), "{replica:?}");
}

fn former_primary_view() -> ClusterView {
    let mut view = cluster();
    view.leader = leader("b", false);
    view.members = vec![member("b", MemberRole::Primary, 500)];
    view
}

#[test]
fn a_former_primary_rewinds_before_following_the_new_leader() {
    let observation = observe(
        PgProcess::Stopped,
        data_dir(true),
        Some(former_primary_view()),
    );
    assert_eq!(
        decide("a", &observation).actions,
        vec![Action::Rewind("b".into())]
    );

    let mut rewound = observation.clone();
    rewound.pg.last_rewind = Some(RewindOutcome {
        leader_term: 7,
        error: None,
    });
    assert_eq!(
        decide("a", &rewound).actions,
        vec![Action::Start(StartAs::Replica {
            follow: Some("b".into())
        })]
    );

    let mut older_term = observation;
    older_term.pg.last_rewind = Some(RewindOutcome {
        leader_term: 3,
        error: None,
    });
    assert_eq!(
        decide("a", &older_term).actions,
        vec![Action::Rewind("b".into())],
        "a rewind against an earlier leader does not count"
    );
}

#[test]
fn a_failed_rewind_re_clones_only_when_allowed() {
    let mut observation = observe(
        PgProcess::Stopped,
        data_dir(true),
        Some(former_primary_view()),
    );
    observation.pg.last_rewind = Some(RewindOutcome {
        leader_term: 7,
        error: Some("could not find common ancestor".into()),
    });
    let refused = decide("a", &observation);
    assert_eq!(refused.state, MemberState::Refused);
    assert!(refused
        .reason
        .unwrap()
        .contains("could not find common ancestor"));

    let mut core = Core::new(Identity {
        reclone_on_rewind_failure: true,
        ..identity("a")
    });
    assert_eq!(
        core.decide(&observation).actions,
        vec![Action::CloneFrom("b".into())]
    );
}

#[test]
fn a_former_primary_started_without_a_leader_rewinds_once_one_appears() {
    let mut core = Core::new(identity("a"));
    let mut view = cluster();
    let stopped = observe(PgProcess::Stopped, data_dir(true), Some(view.clone()));
    assert_eq!(
        core.decide(&stopped).actions,
        vec![Action::Start(StartAs::Replica { follow: None })]
    );
    // Running as a standby now, so the control file no longer says primary.
    view = former_primary_view();
    let running = observe(
        PgProcess::Running(replica_at(90)),
        data_dir(false),
        Some(view.clone()),
    );
    assert!(
        matches!(core.decide(&running).actions[..], [Action::Stop { .. }]),
        "must not stream from {:?} before a rewind",
        view.leader
    );
    let stopped_again = observe(PgProcess::Stopped, data_dir(false), Some(view));
    assert_eq!(
        core.decide(&stopped_again).actions,
        vec![Action::Rewind("b".into())]
    );
}

#[test]
fn the_former_primary_memory_survives_an_agent_restart_only_when_restored() {
    let mut core = Core::new(identity("a"));
    let stopped = observe(PgProcess::Stopped, data_dir(true), Some(cluster()));
    core.decide(&stopped);
    assert!(core.unrewound_former_primary(), "what the shell persists");

    // The agent restarts while its data runs as a standby without a leader;
    // then a leader appears. The control file no longer says primary.
    let running = observe(
        PgProcess::Running(replica_at(90)),
        data_dir(false),
        Some(former_primary_view()),
    );
    let mut forgetful = Core::new(identity("a"));
    assert!(
        !matches!(
            forgetful.decide(&running).actions[..],
            [Action::Stop { .. }]
        ),
        "without the marker the restarted agent would follow without a rewind"
    );
    let mut restored = Core::new(identity("a"));
    restored.restore_unrewound_former_primary();
    assert!(
        matches!(restored.decide(&running).actions[..], [Action::Stop { .. }]),
        "with it, it stops to rewind first"
    );
    assert!(restored.unrewound_former_primary());
}

#[test]
fn a_leader_that_gave_up_after_a_crash_lets_others_race_first() {
    let mut view = cluster();
    view.leader = leader("a", true);
    view.config.primary_start_timeout = Duration::ZERO;
    let mut core = Core::new(identity("a"));
    let crashed = observe(PgProcess::Stopped, data_dir(true), Some(view.clone()));
    assert_eq!(core.decide(&crashed).actions, vec![Action::ReleaseLeader]);

    view.leader = None;
    let mut restarted = observe(
        PgProcess::Running(replica_at(100)),
        data_dir(false),
        Some(view),
    );
    assert!(
        core.decide(&restarted).actions.is_empty(),
        "not racing right away"
    );
    restarted.now += 5_000;
    restarted.lease.valid_until = Some(restarted.now + 5_000);
    assert_eq!(
        core.decide(&restarted).actions,
        vec![Action::AcquireLeader],
        "but after one ttl"
    );
}

#[test]
fn a_member_standing_down_is_no_candidate_even_if_more_advanced() {
    let mut view = cluster();
    let mut stepping_down = member("a", MemberRole::Replica, 900);
    stepping_down.standing_down = true;
    view.members = vec![stepping_down];
    view.last_leader = Some(LeaderStatus {
        leader: "a".into(),
        timeline: 1,
        optime: Lsn(100),
        clean_stop: false,
    });
    let decision = decide(
        "b",
        &observe(
            PgProcess::Running(replica_at(100)),
            data_dir(false),
            Some(view),
        ),
    );
    assert_eq!(
        decision.actions,
        vec![Action::AcquireLeader],
        "{decision:?}"
    );
}

#[test]
fn a_re_clone_is_followed_by_a_plain_start_not_another_clone() {
    let mut core = Core::new(Identity {
        reclone_on_rewind_failure: true,
        ..identity("a")
    });
    let mut failed = observe(
        PgProcess::Stopped,
        data_dir(true),
        Some(former_primary_view()),
    );
    failed.pg.last_rewind = Some(RewindOutcome {
        leader_term: 7,
        error: Some("could not find common ancestor".into()),
    });
    assert_eq!(
        core.decide(&failed).actions,
        vec![Action::CloneFrom("b".into())]
    );

    let cloned = observe(
        PgProcess::Stopped,
        data_dir(false),
        Some(former_primary_view()),
    );
    assert_eq!(
        core.decide(&cloned).actions,
        vec![Action::Start(StartAs::Replica {
            follow: Some("b".into())
        })]
    );
}

#[test]
fn a_released_key_still_seen_as_ours_is_released_again_never_restarted() {
    let mut view = cluster();
    view.leader = leader("a", true);
    view.config.primary_start_timeout = Duration::ZERO;
    let mut core = Core::new(identity("a"));
    let crashed = observe(PgProcess::Stopped, data_dir(true), Some(view));
    assert_eq!(core.decide(&crashed).actions, vec![Action::ReleaseLeader]);
    // The next read still shows the key as ours (it overtook the release).
    let mut again = crashed.clone();
    again.now += 100;
    assert_eq!(core.decide(&again).actions, vec![Action::ReleaseLeader]);
}

// ---- switchover, failover and maintenance mode ----

#[test]
fn a_leader_that_handed_over_never_restarts_on_the_key_it_gave_up() {
    // Simulator seed 12305: pg1 stopped for a switchover, its release timed
    // out in an etcd election (and applied later); once no longer standing
    // down it started its primary again on the key it had given up.
    let (view, pg) = leading_with(Some(intent(Some("pg1"), Some("pg2"))));
    let mut core = Core::new(identity("pg1"));
    let handover = observe(PgProcess::Running(pg), data_dir(true), Some(view.clone()));
    assert!(core
        .decide(&handover)
        .actions
        .contains(&Action::ReleaseLeader));
    let mut stopped = observe(PgProcess::Stopped, data_dir(true), Some(view));
    stopped.now += 2 * DynamicConfig::default().ttl.as_millis() as Millis;
    stopped.lease.valid_until = Some(stopped.now + 4_000);
    assert!(!core.is_standing_down(stopped.now));
    assert_eq!(core.decide(&stopped).actions, vec![Action::ReleaseLeader]);
    // Once etcd showed the key gone, a key won again is a new term to lead on.
    let mut gone = stopped.clone();
    gone.dcs.as_mut().unwrap().leader = None;
    core.decide(&gone);
    let mut won_again = stopped.clone();
    won_again
        .dcs
        .as_mut()
        .unwrap()
        .leader
        .as_mut()
        .unwrap()
        .term += 1;
    assert_eq!(
        core.decide(&won_again).actions,
        vec![Action::Start(StartAs::Primary)]
    );
}

fn streaming(name: &str, flush: u64) -> jai_proto::StandbyLink {
    jai_proto::StandbyLink {
        name: name.into(),
        state: "streaming".into(),
        flush_lsn: Some(Lsn(flush)),
        replay_lag_ms: None,
        synchronous: false,
    }
}

fn intent(from: Option<&str>, to: Option<&str>) -> jai_proto::SwitchoverIntent {
    jai_proto::SwitchoverIntent {
        from: from.map(Into::into),
        to: to.map(Into::into),
        scheduled_at_unix: None,
        requested_at_unix: WALL,
        force: false,
    }
}

/// pg1 leads with pg2 and pg3 as replicas; `intent` pending.
fn leading_with(intent: Option<jai_proto::SwitchoverIntent>) -> (ClusterView, RunningPostgres) {
    let mut view = cluster();
    view.leader = leader("pg1", true);
    view.members = vec![
        member("pg1", MemberRole::Primary, 1000),
        member("pg2", MemberRole::Replica, 1000),
        member("pg3", MemberRole::Replica, 900),
    ];
    view.switchover = intent;
    let mut pg = primary_at(1000);
    pg.slots = vec![slot_name("pg2"), slot_name("pg3")];
    pg.standbys = vec![streaming("pg2", 1000), streaming("pg3", 900)];
    (view, pg)
}

#[test]
fn a_refused_handover_says_whether_waiting_may_help() {
    let (view, mut pg) = leading_with(None);
    pg.standbys.retain(|link| link.name != "pg2");
    let not_yet =
        handover_target("pg1", &view, &pg, &intent(Some("pg1"), Some("pg2"))).unwrap_err();
    assert!(
        not_yet.why.contains("pg2 is not connected to this primary"),
        "{not_yet}"
    );
    assert!(not_yet.may_clear_soon);
    let unknown =
        handover_target("pg1", &view, &pg, &intent(Some("pg1"), Some("pg9"))).unwrap_err();
    assert_eq!(unknown.why, "pg9 is not a registered member");
    assert!(!unknown.may_clear_soon);
    let myself = handover_target("pg1", &view, &pg, &intent(Some("pg1"), Some("pg1"))).unwrap_err();
    assert!(!myself.may_clear_soon);
    // To any: pg3 still qualifies, so pg2's absence does not matter.
    assert_eq!(
        handover_target("pg1", &view, &pg, &intent(Some("pg1"), None)),
        Ok("pg3".into())
    );
}

#[test]
fn a_due_switchover_checkpoints_stops_cleanly_then_releases_the_key() {
    let (view, pg) = leading_with(Some(intent(Some("pg1"), Some("pg2"))));
    let mut core = Core::new(identity("pg1"));
    let decision = core.decide(&observe(PgProcess::Running(pg), data_dir(true), Some(view)));
    assert_eq!(
        decision.actions,
        vec![
            Action::Checkpoint,
            Action::Stop {
                reason: "switchover to pg2".into(),
                handover_to: Some("pg2".into()),
            },
            Action::ReleaseLeader
        ]
    );
    assert!(
        core.is_standing_down(NOW),
        "the old leader must not race back at once"
    );
}

#[test]
fn a_switchover_to_a_replica_that_does_not_stream_is_abandoned() {
    let (view, mut pg) = leading_with(Some(intent(Some("pg1"), Some("pg2"))));
    pg.standbys.retain(|link| link.name != "pg2");
    let decision = decide(
        "pg1",
        &observe(PgProcess::Running(pg), data_dir(true), Some(view)),
    );
    assert!(
        matches!(
            decision.actions.first(),
            Some(Action::ClearSwitchover { reason }) if reason.contains("pg2 is not connected")
        ),
        "{decision:?}"
    );
    assert!(!decision.actions.contains(&Action::ReleaseLeader));
}

#[test]
fn a_switchover_to_any_picks_the_most_advanced_streaming_replica() {
    let (view, pg) = leading_with(None);
    let target = handover_target("pg1", &view, &pg, &intent(Some("pg1"), None));
    assert_eq!(target, Ok("pg2".into()));
}

#[test]
fn a_scheduled_switchover_waits_for_its_time() {
    let mut scheduled = intent(Some("pg1"), Some("pg2"));
    scheduled.scheduled_at_unix = Some(WALL + 60);
    let (view, pg) = leading_with(Some(scheduled));
    let decision = decide(
        "pg1",
        &observe(PgProcess::Running(pg), data_dir(true), Some(view)),
    );
    assert!(
        !decision.actions.contains(&Action::ReleaseLeader),
        "{decision:?}"
    );
    assert!(!decision
        .actions
        .iter()
        .any(|action| matches!(action, Action::ClearSwitchover { .. })));
}

/// pg1 released the key for a switchover; the deciding replica is at `lsn`.
fn after_release(lsn: u64, to: Option<&str>) -> Observation {
    let mut view = cluster();
    let mut former = member("pg1", MemberRole::Primary, 1000);
    former.standing_down = true;
    view.members = vec![
        former,
        member("pg2", MemberRole::Replica, 1000),
        member("pg3", MemberRole::Replica, 1000),
    ];
    view.last_leader = Some(LeaderStatus {
        leader: "pg1".into(),
        timeline: 1,
        optime: Lsn(1000),
        clean_stop: false,
    });
    view.switchover = Some(intent(Some("pg1"), to));
    observe(
        PgProcess::Running(replica_at(lsn)),
        data_dir(false),
        Some(view),
    )
}

#[test]
fn the_switchover_target_takes_the_key_and_the_others_leave_it_to_it() {
    let target = decide("pg3", &after_release(1000, Some("pg3")));
    assert_eq!(target.actions, vec![Action::AcquireLeader]);
    let other = decide("pg2", &after_release(1000, Some("pg3")));
    assert!(other.actions.is_empty(), "{other:?}");
}

#[test]
fn the_others_elect_as_usual_once_the_target_had_one_ttl() {
    let mut core = Core::new(identity("pg2"));
    let mut observation = after_release(1000, Some("pg3"));
    assert!(core.decide(&observation).actions.is_empty());
    observation.now += DynamicConfig::default().ttl.as_millis() as Millis;
    assert_eq!(
        core.decide(&observation).actions,
        vec![Action::AcquireLeader]
    );
}

#[test]
fn a_switchover_to_any_is_an_election_without_the_old_leader() {
    let decision = decide("pg2", &after_release(1000, None));
    assert_eq!(
        decision.actions,
        vec![Action::AcquireLeader],
        "{decision:?}"
    );
}

#[test]
fn the_new_leader_clears_the_intent_and_promotes_naming_the_switchover() {
    let mut observation = after_release(1000, Some("pg2"));
    let view = observation.dcs.as_mut().unwrap();
    view.leader = leader("pg2", true);
    let decision = decide("pg2", &observation);
    assert_eq!(
        decision.actions,
        vec![
            Action::ClearSwitchover {
                reason: "switchover done: pg2 leads".into()
            },
            Action::Promote {
                reason: "switchover from pg1".into()
            }
        ]
    );
    // Should the clearing fail, the leader's duties clear it again.
    let view = observation.dcs.as_mut().unwrap();
    view.members[1] = member("pg2", MemberRole::Primary, 1000);
    observation.pg.process = PgProcess::Running(primary_at(1000));
    let decision = decide("pg2", &observation);
    assert!(
        decision.actions.iter().any(
            |action| matches!(action, Action::ClearSwitchover { reason } if reason.contains("done"))
        ),
        "{decision:?}"
    );
}

#[test]
fn an_old_leader_leading_again_does_not_hand_over_twice_for_one_intent() {
    // Simulator seed 19648: pg1 handed over to pg2, which took the key and
    // died before clearing the intent; pg1, elected again, handed over again.
    let pending = intent(Some("pg1"), None);
    let (view, pg) = leading_with(Some(pending));
    let mut core = Core::new(identity("pg1"));
    let handover = observe(
        PgProcess::Running(pg.clone()),
        data_dir(true),
        Some(view.clone()),
    );
    assert!(core
        .decide(&handover)
        .actions
        .contains(&Action::ReleaseLeader));
    let mut again = handover.clone();
    again.now += 10_000;
    again.lease.valid_until = Some(again.now + 4_000);
    let view = again.dcs.as_mut().unwrap();
    view.leader.as_mut().unwrap().term += 1;
    let decision = core.decide(&again);
    assert!(
        !decision
            .actions
            .iter()
            .any(|action| matches!(action, Action::Stop { .. } | Action::ReleaseLeader)),
        "{decision:?}"
    );
    assert!(
        matches!(
            decision.actions.first(),
            Some(Action::ClearSwitchover { reason }) if reason.contains("already carried out")
        ),
        "{decision:?}"
    );
}

#[test]
fn a_failover_target_behind_the_leader_takes_the_key_only_when_forced() {
    let mut observation = after_release(10, Some("pg3"));
    let view = observation.dcs.as_mut().unwrap();
    view.switchover = Some(intent(None, Some("pg3")));
    view.config.maximum_lag_on_failover = 100;
    let refused = decide("pg3", &observation);
    assert!(refused.actions.is_empty(), "{refused:?}");
    assert!(refused.reason.unwrap().contains("not eligible"));
    observation
        .dcs
        .as_mut()
        .unwrap()
        .switchover
        .as_mut()
        .unwrap()
        .force = true;
    assert_eq!(
        decide("pg3", &observation).actions,
        vec![Action::AcquireLeader]
    );
}

#[test]
fn in_maintenance_mode_nobody_races_and_a_stopped_leader_is_not_restarted() {
    let mut observation = after_release(1000, None);
    let view = observation.dcs.as_mut().unwrap();
    view.switchover = None;
    view.config.pause = true;
    let decision = decide("pg2", &observation);
    assert!(decision.actions.is_empty(), "{decision:?}");
    assert!(decision.reason.unwrap().contains("maintenance mode"));

    let mut view = cluster();
    view.config.pause = true;
    view.leader = leader("pg1", true);
    let decision = decide(
        "pg1",
        &observe(PgProcess::Stopped, data_dir(true), Some(view)),
    );
    assert!(decision.actions.is_empty(), "{decision:?}");
}

#[test]
fn in_maintenance_mode_an_operator_failover_still_happens() {
    let mut observation = after_release(1000, Some("pg3"));
    let view = observation.dcs.as_mut().unwrap();
    view.switchover = Some(intent(None, Some("pg3")));
    view.config.pause = true;
    assert_eq!(
        decide("pg3", &observation).actions,
        vec![Action::AcquireLeader]
    );
}

#[test]
fn in_maintenance_mode_a_switchover_to_the_best_replica_still_gets_a_leader() {
    // Simulator seeds 1444 and 1795: pg1 handed over in maintenance mode to
    // "the best replica", released the key, and nobody took it.
    let mut observation = after_release(1000, None);
    observation.dcs.as_mut().unwrap().config.pause = true;
    assert_eq!(
        decide("pg2", &observation).actions,
        vec![Action::AcquireLeader]
    );
    let other = decide("pg3", &observation);
    assert!(other.actions.is_empty(), "{other:?}");
    // Not yet due: maintenance mode still holds everyone back.
    let view = observation.dcs.as_mut().unwrap();
    view.switchover.as_mut().unwrap().scheduled_at_unix = Some(WALL + 60);
    assert!(decide("pg2", &observation).actions.is_empty());
}

#[test]
fn in_maintenance_mode_a_primary_without_a_lease_is_still_fenced() {
    let (mut view, pg) = leading_with(None);
    view.config.pause = true;
    let mut observation = observe(PgProcess::Running(pg), data_dir(true), Some(view));
    observation.lease.valid_until = Some(NOW + 10);
    let decision = decide("pg1", &observation);
    assert!(
        matches!(decision.actions.as_slice(), [Action::Stop { .. }]),
        "{decision:?}"
    );
}

#[test]
#[should_panic(expected = "safety violation")]
fn the_safety_check_catches_releasing_the_key_while_writable() {
    let (view, pg) = leading_with(None);
    let observation = observe(PgProcess::Running(pg), data_dir(true), Some(view));
    let decision = Decision::act(MemberState::Running, "bug", vec![Action::ReleaseLeader]);
    assert_safe(&identity("pg1"), &observation, &decision);
}

#[test]
fn a_member_stops_standing_down_once_another_member_leads() {
    let (view, pg) = leading_with(Some(intent(Some("pg1"), Some("pg2"))));
    let mut core = Core::new(identity("pg1"));
    core.decide(&observe(
        PgProcess::Running(pg),
        data_dir(true),
        Some(view.clone()),
    ));
    assert!(core.is_standing_down(NOW));
    let mut led_by_pg2 = view;
    led_by_pg2.leader = leader("pg2", false);
    led_by_pg2.switchover = None;
    core.decide(&observe(
        PgProcess::Stopped,
        data_dir(true),
        Some(led_by_pg2),
    ));
    assert!(
        !core.is_standing_down(NOW),
        "a switchover back must be possible at once"
    );
}

// ---- synchronous replication (docs/architecture.md, "Safety invariants", §3.3) ----

fn sync_actions(decision: &Decision) -> Vec<Action> {
    decision
        .actions
        .iter()
        .filter(|action| {
            matches!(
                action,
                Action::WriteSync(_) | Action::SetSyncNames(_) | Action::ClearSync
            )
        })
        .cloned()
        .collect()
}

fn sync_state(leader: &str, members: &[&str]) -> jai_proto::SyncState {
    jai_proto::SyncState {
        leader: leader.into(),
        members: members.iter().map(|name| (*name).into()).collect(),
    }
}

fn first(names: &[&str]) -> SyncNames {
    SyncNames::First {
        count: 1,
        names: names.iter().map(|name| (*name).into()).collect(),
    }
}

/// pg1 leads in `mode` with pg2 and pg3 streaming, the `sync` key and
/// `synchronous_standby_names` as given.
fn leading_in_sync_mode(
    mode: jai_proto::SynchronousMode,
    key: Option<jai_proto::SyncState>,
    names: SyncNames,
) -> (ClusterView, RunningPostgres) {
    let (mut view, mut pg) = leading_with(None);
    view.config.synchronous_mode = mode;
    view.sync = key;
    pg.sync_names = names;
    (view, pg)
}

fn lead(view: ClusterView, pg: RunningPostgres) -> Decision {
    decide(
        "pg1",
        &observe(PgProcess::Running(pg), data_dir(true), Some(view)),
    )
}

#[test]
fn a_standby_enters_the_sync_key_before_postgresql_waits_for_it() {
    let (view, pg) = leading_in_sync_mode(jai_proto::SynchronousMode::On, None, SyncNames::Off);
    assert_eq!(
        sync_actions(&lead(view, pg)),
        vec![
            Action::WriteSync(sync_state("pg1", &["pg2"])),
            Action::SetSyncNames(first(&["pg2"])),
        ]
    );
}

#[test]
fn a_replaced_standby_leaves_postgresql_before_it_leaves_the_sync_key() {
    let (view, mut pg) = leading_in_sync_mode(
        jai_proto::SynchronousMode::On,
        Some(sync_state("pg1", &["pg2"])),
        first(&["pg2"]),
    );
    pg.standbys.retain(|link| link.name != "pg2");
    assert_eq!(
        sync_actions(&lead(view, pg)),
        vec![
            Action::WriteSync(sync_state("pg1", &["pg2", "pg3"])),
            Action::SetSyncNames(first(&["pg3"])),
            Action::WriteSync(sync_state("pg1", &["pg3"])),
        ]
    );
}

#[test]
fn a_lagging_sync_standby_is_replaced_by_a_healthy_one() {
    let (mut view, mut pg) = leading_in_sync_mode(
        jai_proto::SynchronousMode::On,
        Some(sync_state("pg1", &["pg3"])),
        first(&["pg3"]),
    );
    view.config.maximum_lag_on_syncnode = 50;
    pg.standbys = vec![streaming("pg2", 1000), streaming("pg3", 900)];
    let actions = sync_actions(&lead(view, pg));
    assert_eq!(actions.get(1), Some(&Action::SetSyncNames(first(&["pg2"]))));
}

#[test]
fn a_listed_standby_stays_while_it_is_healthy() {
    let (view, pg) = leading_in_sync_mode(
        jai_proto::SynchronousMode::On,
        Some(sync_state("pg1", &["pg3"])),
        first(&["pg3"]),
    );
    assert_eq!(
        sync_actions(&lead(view, pg)),
        vec![],
        "no churn towards pg2"
    );
}

#[test]
fn on_mode_falls_back_to_async_and_says_so_when_no_standby_is_eligible() {
    let (view, mut pg) = leading_in_sync_mode(
        jai_proto::SynchronousMode::On,
        Some(sync_state("pg1", &["pg2"])),
        first(&["pg2"]),
    );
    pg.standbys.clear();
    let decision = lead(view, pg);
    assert_eq!(
        sync_actions(&decision),
        vec![
            Action::SetSyncNames(SyncNames::Off),
            Action::WriteSync(sync_state("pg1", &[])),
        ]
    );
    assert!(decision.reason.unwrap().contains("running asynchronously"));
}

#[test]
fn strict_mode_never_falls_back() {
    let (view, mut pg) = leading_in_sync_mode(
        jai_proto::SynchronousMode::Strict,
        Some(sync_state("pg1", &["pg2"])),
        first(&["pg2"]),
    );
    pg.standbys.clear();
    let decision = lead(view, pg);
    assert_eq!(sync_actions(&decision), vec![]);
    assert!(decision.reason.unwrap().contains("commits wait for pg2"));

    let (view, mut pg) =
        leading_in_sync_mode(jai_proto::SynchronousMode::Strict, None, SyncNames::Off);
    pg.standbys.clear();
    assert_eq!(
        sync_actions(&lead(view, pg)),
        vec![
            Action::WriteSync(sync_state("pg1", &[])),
            Action::SetSyncNames(SyncNames::AnyStandby),
        ]
    );
}

#[test]
fn turning_synchronous_mode_off_unlists_before_deleting_the_key() {
    let (view, pg) = leading_in_sync_mode(
        jai_proto::SynchronousMode::Off,
        Some(sync_state("pg1", &["pg2"])),
        first(&["pg2"]),
    );
    assert_eq!(
        sync_actions(&lead(view, pg)),
        vec![Action::SetSyncNames(SyncNames::Off), Action::ClearSync]
    );
}

#[test]
fn in_sync_mode_only_a_listed_standby_runs_for_leader() {
    let mut view = cluster();
    view.config.synchronous_mode = jai_proto::SynchronousMode::On;
    view.sync = Some(sync_state("pg1", &["pg3"]));
    view.members = vec![
        member("pg2", MemberRole::Replica, 1000),
        member("pg3", MemberRole::Replica, 900),
    ];
    let more_advanced = decide(
        "pg2",
        &observe(
            PgProcess::Running(replica_at(1000)),
            data_dir(false),
            Some(view.clone()),
        ),
    );
    assert!(more_advanced.actions.is_empty(), "{more_advanced:?}");
    assert!(more_advanced
        .reason
        .unwrap()
        .contains("not a synchronous standby"));
    let listed = decide(
        "pg3",
        &observe(
            PgProcess::Running(replica_at(900)),
            data_dir(false),
            Some(view),
        ),
    );
    assert_eq!(listed.actions, vec![Action::AcquireLeader], "{listed:?}");
}

#[test]
fn a_switchover_to_an_async_standby_needs_force() {
    let (view, pg) = leading_in_sync_mode(
        jai_proto::SynchronousMode::On,
        Some(sync_state("pg1", &["pg3"])),
        first(&["pg3"]),
    );
    let mut asked = intent(Some("pg1"), Some("pg2"));
    let refused = handover_target("pg1", &view, &pg, &asked);
    let refused = refused.unwrap_err();
    assert!(
        refused.why.contains("not a synchronous standby"),
        "{refused}"
    );
    assert!(!refused.may_clear_soon);
    asked.force = true;
    assert_eq!(handover_target("pg1", &view, &pg, &asked), Ok("pg2".into()));
}

#[test]
#[should_panic(expected = "safety violation")]
fn the_safety_check_catches_promoting_a_standby_outside_the_sync_key() {
    let mut view = cluster();
    view.config.synchronous_mode = jai_proto::SynchronousMode::On;
    view.sync = Some(sync_state("pg1", &["pg3"]));
    view.leader = leader("pg2", true);
    let observation = observe(
        PgProcess::Running(replica_at(1000)),
        data_dir(false),
        Some(view),
    );
    let decision = Decision::act(
        MemberState::Running,
        "bug",
        vec![Action::Promote {
            reason: "bug".into(),
        }],
    );
    assert_safe(&identity("pg2"), &observation, &decision);
}

#[test]
fn a_bootstrapping_primary_never_waits_for_standbys_that_cannot_exist_yet() {
    let mut view = cluster();
    view.config.synchronous_mode = jai_proto::SynchronousMode::Strict;
    view.initialize = Some(Initialize::InProgress { mine: true });
    assert_eq!(sync::names_for_new_primary("pg1", &view), SyncNames::Off);
    view.initialize = Some(Initialize::Done {
        system_id: "42".into(),
    });
    assert_eq!(
        sync::names_for_new_primary("pg1", &view),
        SyncNames::AnyStandby
    );
}

#[test]
fn a_switchover_target_short_of_the_final_position_does_not_take_the_key() {
    let mut observation = after_release(990, Some("pg2"));
    let decision = decide("pg2", &observation);
    assert!(decision.actions.is_empty(), "{decision:?}");
    assert!(decision.reason.unwrap().contains("10 bytes short"));
    observation.pg.process = PgProcess::Running(replica_at(1000));
    assert_eq!(
        decide("pg2", &observation).actions,
        vec![Action::AcquireLeader]
    );
}

fn restore_intent(restorer: &str, phase: jai_proto::RestorePhase) -> jai_proto::RestoreIntent {
    jai_proto::RestoreIntent {
        id: "r1".into(),
        target: "2026-12-03 14:02:00+00".into(),
        target_unix: 1_796_306_520,
        restorer: restorer.into(),
        requested_at: 1_796_310_000,
        phase,
    }
}

fn stopped(name: &str) -> MemberStatus {
    MemberStatus {
        state: MemberState::Stopped,
        role: MemberRole::Unknown,
        ..member(name, MemberRole::Replica, 0)
    }
}

#[test]
fn a_restore_stops_the_old_leader_and_takes_its_key_away() {
    let mut view = cluster();
    view.leader = leader("a", true);
    view.restore = Some(restore_intent("b", jai_proto::RestorePhase::Stopping));
    view.members = vec![
        member("a", MemberRole::Primary, 100),
        member("b", MemberRole::Replica, 100),
    ];
    let decision = decide(
        "a",
        &observe(
            PgProcess::Running(primary_at(100)),
            data_dir(true),
            Some(view),
        ),
    );
    assert!(
        matches!(decision.actions[0], Action::Stop { .. }),
        "{decision:?}"
    );
    assert_eq!(decision.actions[1], Action::ReleaseLeader);
}

#[test]
fn the_restorer_waits_for_every_member_to_stop_then_takes_the_key_then_restores() {
    let stopping = jai_proto::RestorePhase::Stopping;
    let mut view = cluster();
    view.leader = leader("a", false);
    view.restore = Some(restore_intent("b", stopping));
    view.members = vec![member("a", MemberRole::Primary, 100), stopped("b")];
    let observation = observe(PgProcess::Stopped, data_dir(false), Some(view.clone()));
    let waiting = decide("b", &observation);
    assert!(waiting.actions.is_empty(), "{waiting:?}");
    assert!(waiting.reason.unwrap().contains("waiting for a to stop"));

    view.members = vec![stopped("a"), stopped("b")];
    view.leader = None;
    let taking = decide(
        "b",
        &observe(PgProcess::Stopped, data_dir(false), Some(view.clone())),
    );
    assert_eq!(taking.actions, vec![Action::AcquireLeader]);

    view.leader = leader("b", true);
    let mut core = Core::new(identity("b"));
    let restoring = core.decide(&observe(
        PgProcess::Stopped,
        data_dir(false),
        Some(view.clone()),
    ));
    assert_eq!(
        restoring.actions,
        vec![Action::RestoreTo(restore_intent("b", stopping))]
    );
    // Recovering to the target with the key: never promoted early.
    let recovering = core.decide(&observe(
        PgProcess::Running(replica_at(50)),
        data_dir(false),
        Some(view.clone()),
    ));
    assert!(recovering.actions.is_empty(), "{recovering:?}");
    // Promoted by PostgreSQL at the target: recorded, others rejoin.
    let mut promoted = primary_at(60);
    promoted.timeline = 3;
    let recorded = core.decide(&observe(
        PgProcess::Running(promoted),
        data_dir(false),
        Some(view),
    ));
    let [Action::RecordRestore { intent, entry }] = recorded.actions.as_slice() else {
        panic!("{recorded:?}")
    };
    assert_eq!(intent.phase, jai_proto::RestorePhase::Rejoining);
    assert_eq!(entry.timeline, 2);
    assert!(entry.reason.contains("restore to 2026-12-03 14:02"));
}

#[test]
fn after_a_restore_the_others_reclone_from_the_restorer() {
    let mut view = cluster();
    view.leader = leader("b", false);
    view.restore = Some(restore_intent("b", jai_proto::RestorePhase::Rejoining));
    let mut restorer = member("b", MemberRole::Primary, 60);
    restorer.timeline = Some(3);
    view.members = vec![restorer, stopped("a")];
    let mut core = Core::new(identity("a"));
    let recloning = core.decide(&observe(
        PgProcess::Stopped,
        data_dir(true),
        Some(view.clone()),
    ));
    assert_eq!(recloning.actions, vec![Action::CloneFrom("b".into())]);
    // Running on the old timeline (never cloned): stop first.
    let mut fresh = Core::new(identity("a"));
    let old = fresh.decide(&observe(
        PgProcess::Running(replica_at(100)),
        data_dir(false),
        Some(view),
    ));
    assert!(matches!(old.actions[0], Action::Stop { .. }), "{old:?}");
}
