//! A session's data is bounded: an insert that would take it over the
//! limit fails with a clear error and changes nothing.

mod common;

use common::*;
use tollgate_session::Sessions;

#[tokio::test]
async fn an_insert_over_the_data_limit_fails_and_changes_nothing() {
    let sessions = Sessions::builder().max_data_bytes(100).build().unwrap();
    let mut c = Client::new(app(sessions));
    let forty = "x".repeat(40);
    // Each entry: the key, plus the value's JSON (quotes included).
    let res = c.send("POST", &format!("/set/a/{forty}")).await;
    assert_eq!(res.status, 200);
    let res = c.send("POST", &format!("/set/b/{forty}")).await;
    assert_eq!(res.status, 200, "a and b: 2 × 43 bytes");
    let res = c.send("POST", &format!("/set/c/{forty}")).await;
    assert_eq!(res.status, 500);
    assert!(
        res.body.contains("over its limit of 100"),
        "a clear error: {}",
        res.body
    );
    assert_eq!(c.send("GET", "/get/c").await.body, "none", "not stored");
    assert_eq!(
        c.send("GET", "/get/a").await.body,
        format!("\"{forty}\""),
        "the rest is kept"
    );
    // Replacing an entry counts its new value, not both.
    let res = c.send("POST", &format!("/set/a/{}", "y".repeat(50))).await;
    assert_eq!(res.status, 200);
    assert!(Sessions::builder().max_data_bytes(0).build().is_err());
}
