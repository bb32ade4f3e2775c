//! Wall-clock and kernel-clock times for expiring allowances.
//!
//! The saved file holds expiries as RFC 3339 UTC text (unix seconds in
//! memory). The kernel compares against `CLOCK_BOOTTIME` nanoseconds, so the
//! conversion happens each time an entry is written: the remaining time is
//! carried over, not the wall-clock instant, and a later wall-clock jump
//! (NTP step) does not move an expiry already in the kernel.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Now, in unix seconds.
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `2026-11-29T06:00:00Z`.
pub fn rfc3339(unix: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(unix)).to_string()
}

/// Parses `2026-11-29T06:00:00Z` (UTC, as `rfc3339` writes it).
pub fn parse_rfc3339(text: &str) -> Result<u64, String> {
    let at = humantime::parse_rfc3339(text)
        .map_err(|e| format!("invalid expiry '{text}' ({e}): write UTC as 2026-11-29T18:00:00Z"))?;
    at.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .map_err(|_| format!("invalid expiry '{text}': before 1970"))
}

/// `--for` values: `90s`, `30m`, `2h`, `7d`, `1h 30m`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text)
        .map_err(|e| format!("invalid duration '{text}' ({e}): use e.g. 90s, 30m, 2h, 7d"))?;
    if d < Duration::from_secs(1) {
        return Err(format!("duration '{text}' is shorter than one second"));
    }
    if d > Duration::from_secs(10 * 366 * 24 * 3600) {
        return Err(format!(
            "duration '{text}' is over ten years; leave --for out for an allowance that does not expire"
        ));
    }
    Ok(d)
}

/// `1h 59m 58s` left until `unix`, or `expired`.
pub fn remaining(unix: u64, now: u64) -> String {
    if unix <= now {
        return "expired".to_string();
    }
    humantime::format_duration(Duration::from_secs(unix - now)).to_string()
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes into the timespec we own; both clocks always exist on Linux.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1_000_000_000) + ts.tv_nsec as u64
}

/// `bpf_ktime_get_boot_ns()` now.
pub fn boot_ns() -> u64 {
    clock_ns(libc::CLOCK_BOOTTIME)
}

/// The kernel's `expires_ns` for an expiry at `unix` seconds: the boot-time
/// instant as far ahead as `unix` is now. Never 0 (0 means "never"): an
/// expiry in the past becomes 1, already lapsed.
pub fn boot_ns_at(unix: u64) -> u64 {
    let now_wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let at = Duration::from_secs(unix);
    let boot = boot_ns();
    match at.checked_sub(now_wall) {
        Some(ahead) => boot.saturating_add(ahead.as_nanos().min(u128::from(u64::MAX)) as u64),
        None => 1,
    }
}

/// The inverse for display: unix seconds of a kernel `expires_ns`.
pub fn unix_at_boot_ns(expires_ns: u64) -> u64 {
    let boot = boot_ns();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    if expires_ns >= boot {
        (now + Duration::from_nanos(expires_ns - boot)).as_secs()
    } else {
        now.saturating_sub(Duration::from_nanos(boot - expires_ns))
            .as_secs()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trip_and_errors() {
        assert_eq!(rfc3339(1_795_000_000), "2026-11-18T11:06:40Z");
        assert_eq!(parse_rfc3339("2026-11-18T11:06:40Z"), Ok(1_795_000_000));
        assert!(
            parse_rfc3339("2026-11-18")
                .unwrap_err()
                .contains("2026-11-18")
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert!(parse_duration("0s").unwrap_err().contains("shorter"));
        assert!(parse_duration("2 hours please").is_err());
        assert!(parse_duration("20y").unwrap_err().contains("ten years"));
        assert_eq!(remaining(100, 100), "expired");
        assert_eq!(remaining(3700, 100), "1h");
    }

    #[test]
    fn boot_time_conversion_keeps_the_time_left() {
        let now = now_unix();
        let boot = boot_ns();
        let at = boot_ns_at(now + 60);
        assert!(at > boot + 58_000_000_000 && at < boot + 62_000_000_000);
        assert_eq!(boot_ns_at(now - 5), 1);
        let back = unix_at_boot_ns(at);
        assert!(back.abs_diff(now + 60) <= 1);
    }
}
