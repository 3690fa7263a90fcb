//! What `/proc` says about a process and the machine: peak memory and CPU time, which the
//! bench reports next to each rate to show where the cores went.

use std::path::Path;

/// A `kB` field of `/proc/<pid>/status` (`VmHWM` is the peak resident set), in bytes.
pub fn status_bytes(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(field)?.strip_prefix(':')?;
        let kb: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
        Some(kb * 1024)
    })
}

/// User plus system CPU seconds a process has used so far (all its threads).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    cpu_seconds_at(Path::new(&format!("/proc/{pid}/stat")))
}

/// The same for this process.
pub fn self_cpu_seconds() -> Option<f64> {
    cpu_seconds_at(Path::new("/proc/self/stat"))
}

/// User plus system CPU seconds of this process's children that have exited and been waited
/// for.
pub fn children_cpu_seconds() -> Option<f64> {
    ticks_at(Path::new("/proc/self/stat"), 13)
}

fn cpu_seconds_at(path: &Path) -> Option<f64> {
    ticks_at(path, 11)
}

/// Two consecutive tick fields of a `stat` file (0-based after the command name), summed.
fn ticks_at(path: &Path, first: usize) -> Option<f64> {
    let text = std::fs::read_to_string(path).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let fields: Vec<&str> = text.get(text.rfind(')')? + 2..)?.split(' ').collect();
    let user: u64 = fields.get(first)?.parse().ok()?;
    let system: u64 = fields.get(first + 1)?.parse().ok()?;
    // USER_HZ is 100 on every Linux architecture's /proc ABI.
    Some((user + system) as f64 / 100.0)
}

/// Online CPUs and the model name from `/proc/cpuinfo`.
pub fn machine() -> (usize, String) {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    (cpus, model)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let pid = std::process::id();
        assert!(status_bytes(pid, "VmHWM").is_some_and(|b| b > 0));
        assert!(cpu_seconds(pid).is_some());
        assert!(self_cpu_seconds().is_some());
        assert!(children_cpu_seconds().is_some());
        assert!(machine().0 >= 1);
    }
}
