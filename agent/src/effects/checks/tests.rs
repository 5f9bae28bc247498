use super::*;
use crate::desired::model::CommandCheckSpec;

fn check(probe: Probe, retries: u32) -> Check {
    Check {
        name: "t".into(),
        role: "r".into(),
        probe,
        retries,
        interval: Duration::from_secs(30),
        timeout: Duration::from_secs(5),
        delay: Duration::ZERO,
    }
}

#[tokio::test(start_paused = true)]
async fn retries_wait_the_interval_and_pass_on_a_later_attempt() {
    let c = check(
        Probe::Tcp(TcpCheckSpec {
            address: "unused".into(),
        }),
        5,
    );
    let start = tokio::time::Instant::now();
    let mut calls = 0;
    let r = attempt_loop(&c, || {
        calls += 1;
        let n = calls;
        async move {
            if n < 3 {
                bail!("not yet ({n})")
            } else {
                Ok(())
            }
        }
    })
    .await;
    assert!(r.ok && r.attempts == 3, "{r:?}");
    // Two waits of 30 s, on the paused clock: no real time passed.
    assert_eq!(start.elapsed(), Duration::from_secs(60));
}

#[tokio::test(start_paused = true)]
async fn a_hanging_attempt_times_out_and_the_last_error_is_kept() {
    let c = check(
        Probe::Tcp(TcpCheckSpec {
            address: "unused".into(),
        }),
        2,
    );
    let r = attempt_loop(&c, || async {
        std::future::pending::<()>().await;
        Ok(())
    })
    .await;
    assert!(!r.ok && r.attempts == 2);
    assert!(r.message.contains("timed out after 5s"), "{}", r.message);
}

#[tokio::test]
async fn failing_command_reports_exit_code_and_stderr() {
    let c = check(
        Probe::Command(CommandCheckSpec {
            argv: vec![
                "/bin/sh".into(),
                "-c".into(),
                "echo broken >&2; exit 3".into(),
            ],
            exit_code: 0,
        }),
        1,
    );
    let r = run_one(&c, None).await;
    assert!(!r.ok);
    assert!(
        r.message.contains("exited with 3, expected 0: broken"),
        "{}",
        r.message
    );
}

#[tokio::test]
async fn command_exit_code_is_compared() {
    let ok = check(
        Probe::Command(CommandCheckSpec {
            argv: vec!["/bin/false".into()],
            exit_code: 1,
        }),
        1,
    );
    assert!(run_one(&ok, None).await.ok);
}

#[tokio::test]
async fn tcp_refused_port_fails() {
    // Bind then drop to get a port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let r = run_one(
        &check(
            Probe::Tcp(TcpCheckSpec {
                address: format!("127.0.0.1:{port}"),
            }),
            1,
        ),
        None,
    )
    .await;
    assert!(
        !r.ok && r.message.contains("cannot connect"),
        "{}",
        r.message
    );
}

#[tokio::test]
async fn unit_check_without_systemd_fails_clearly() {
    let r = run_one(
        &check(
            Probe::Unit(UnitCheckSpec {
                name: "x.service".into(),
                settle: None,
            }),
            1,
        ),
        None,
    )
    .await;
    assert!(!r.ok && r.message.contains("need systemd"), "{}", r.message);
}

/// A check right after a `reload` can reach the old workers: `delay`
/// holds the first attempt back.
#[tokio::test(start_paused = true)]
async fn delay_holds_back_the_first_attempt() {
    let mut c = check(
        Probe::Tcp(TcpCheckSpec {
            address: "unused".into(),
        }),
        1,
    );
    c.delay = Duration::from_secs(3);
    let start = tokio::time::Instant::now();
    let r = attempt_loop(&c, || {
        let at = start.elapsed();
        async move {
            if at >= Duration::from_secs(3) {
                Ok(())
            } else {
                bail!("probed after {at:?}, before the delay")
            }
        }
    })
    .await;
    assert!(r.ok && r.attempts == 1, "{r:?}");
    assert_eq!(start.elapsed(), Duration::from_secs(3));
}
