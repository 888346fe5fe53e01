//! The counters each operation exports (in-process store).

mod common;

use common::*;
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use tollgate_session::Sessions;

#[test]
fn counters() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut c = Client::new(app(Sessions::in_memory()));
            c.send("POST", "/set/a/1").await; // create
            c.send("POST", "/set/b/2").await; // load + save
            c.send("POST", "/login/alice").await; // load + rotation (create)
            c.send("POST", "/revoke-others").await; // load + revocation (0)
            c.send("POST", "/logout").await; // destroy
        });
    });
    let counters: Vec<(String, Vec<String>, u64)> = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter_map(|(k, _, _, v)| match v {
            DebugValue::Counter(n) => {
                let key = k.key();
                let labels = key
                    .labels()
                    .map(|l| format!("{}={}", l.key(), l.value()))
                    .collect();
                Some((key.name().to_owned(), labels, n))
            }
            _ => None,
        })
        .collect();
    let total = |name: &str| -> u64 {
        counters
            .iter()
            .filter(|(n, _, _)| n == name)
            .map(|(_, _, v)| v)
            .sum()
    };
    assert_eq!(total("tollgate_session_creates_total"), 2, "{counters:?}");
    assert_eq!(total("tollgate_session_loads_total"), 3, "{counters:?}");
    assert_eq!(total("tollgate_session_saves_total"), 1, "{counters:?}");
    assert_eq!(total("tollgate_session_rotations_total"), 1, "{counters:?}");
    assert_eq!(total("tollgate_session_destroys_total"), 1, "{counters:?}");
    assert_eq!(total("tollgate_session_store_errors_total"), 0);
    assert!(
        counters
            .iter()
            .any(|(n, l, _)| n == "tollgate_session_loads_total"
                && l.contains(&"store=memory".to_owned())
                && l.contains(&"result=hit".to_owned()))
    );
}
