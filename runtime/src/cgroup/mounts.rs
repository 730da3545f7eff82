//! Where the cgroup hierarchies are and where this process sits in them: parsing
//! `/proc/self/mountinfo` and `/proc/self/cgroup` into a [`Layout`]. Pure: the texts come in.

use std::path::{Path, PathBuf};

/// One mounted cgroup hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupMount {
    /// Where it is mounted.
    pub point: PathBuf,
    /// The cgroup the mount shows at its top (not `/` inside some containers).
    pub root: String,
    /// `None` for the unified (v2) hierarchy; otherwise the v1 controllers it carries.
    pub controllers: Option<Vec<String>>,
}

/// A hierarchy and this process's directory in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    pub mount: CgroupMount,
    /// This process's cgroup, as a directory under the mount point.
    pub own_dir: PathBuf,
}

/// How this host's cgroups are arranged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// One unified hierarchy carries every controller (`/sys/fs/cgroup` is cgroup2).
    Unified(Placed),
    /// v1 hierarchies carry the controllers; the unified one, if mounted, carries none and is
    /// where device-gate programs attach (what systemd calls hybrid).
    Hybrid {
        v1: Vec<Placed>,
        unified: Option<Placed>,
    },
}

impl Layout {
    /// The v1 hierarchy carrying `controller`, in a hybrid layout.
    pub fn v1_with(&self, controller: &str) -> Option<&Placed> {
        match self {
            Layout::Unified(_) => None,
            Layout::Hybrid { v1, .. } => v1.iter().find(|p| {
                p.mount
                    .controllers
                    .as_ref()
                    .is_some_and(|c| c.iter().any(|n| n == controller))
            }),
        }
    }
}

/// Octal escapes (`\040` for a space) in mountinfo fields.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let digits = std::str::from_utf8(&bytes[i + 1..i + 4]).unwrap_or("");
            if let Ok(value) = u8::from_str_radix(digits, 8) {
                out.push(value);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Every cgroup mount in `/proc/self/mountinfo` text. Named v1 hierarchies (`name=systemd`)
/// carry no controller and are left out; so is a second mount of the same hierarchy.
pub fn parse_mountinfo(text: &str) -> Vec<CgroupMount> {
    let mut mounts: Vec<CgroupMount> = Vec::new();
    for line in text.lines() {
        let Some((before, after)) = line.split_once(" - ") else {
            continue;
        };
        let fields: Vec<&str> = before.split(' ').collect();
        let after: Vec<&str> = after.split(' ').collect();
        let (Some(root), Some(point), Some(fstype)) = (fields.get(3), fields.get(4), after.first())
        else {
            continue;
        };
        let controllers = match *fstype {
            "cgroup2" => None,
            "cgroup" => {
                let options = after.get(2).copied().unwrap_or_default();
                let known: Vec<String> = options
                    .split(',')
                    .filter(|o| !matches!(*o, "rw" | "ro") && !o.contains('='))
                    .filter(|o| {
                        !matches!(
                            *o,
                            "relatime"
                                | "noatime"
                                | "nosuid"
                                | "nodev"
                                | "noexec"
                                | "clone_children"
                        )
                    })
                    .map(str::to_owned)
                    .collect();
                if known.is_empty() {
                    continue;
                }
                Some(known)
            }
            _ => continue,
        };
        let mount = CgroupMount {
            point: PathBuf::from(unescape(point)),
            root: unescape(root),
            controllers,
        };
        if !mounts.iter().any(|m| m.controllers == mount.controllers) {
            mounts.push(mount);
        }
    }
    mounts
}

/// `/proc/self/cgroup` lines: (controllers, path); the unified hierarchy has no controllers.
pub fn parse_proc_cgroup(text: &str) -> Vec<(Vec<String>, String)> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let id = parts.next()?;
            let controllers = parts.next()?;
            let path = parts.next()?;
            // Named v1 hierarchies (`name=systemd`) carry no controller, but are not the
            // unified hierarchy either, which is always id 0.
            if id != "0"
                && controllers
                    .split(',')
                    .all(|c| c.is_empty() || c.contains('='))
            {
                return None;
            }
            let controllers = controllers
                .split(',')
                .filter(|c| !c.is_empty() && !c.contains('='))
                .map(str::to_owned)
                .collect();
            Some((controllers, path.to_owned()))
        })
        .collect()
}

/// The directory of cgroup `path` under a mount whose top shows cgroup `root`, compared
/// component by component; `None` when the path is not under the mount or is not plain.
fn dir_of(mount: &CgroupMount, path: &str) -> Option<PathBuf> {
    let parts = |p: &str| -> Option<Vec<String>> {
        p.split('/')
            .filter(|c| !c.is_empty())
            .map(|c| (c != ".." && c != ".").then(|| c.to_owned()))
            .collect()
    };
    let path = parts(path)?;
    let root = parts(&mount.root)?;
    let relative = path.strip_prefix(root.as_slice())?;
    let mut dir = mount.point.clone();
    dir.extend(relative);
    Some(dir)
}

/// Puts the mounts and this process's cgroups together.
pub fn layout(mountinfo: &str, proc_cgroup: &str) -> Result<Layout, String> {
    let mounts = parse_mountinfo(mountinfo);
    let memberships = parse_proc_cgroup(proc_cgroup);
    let own_path = |controllers: Option<&Vec<String>>| -> Option<String> {
        memberships.iter().find_map(|(cs, path)| {
            let matches = match controllers {
                None => cs.is_empty(),
                Some(want) => want.iter().all(|w| cs.contains(w)) && !cs.is_empty(),
            };
            matches.then(|| path.clone())
        })
    };
    let place = |mount: &CgroupMount| -> Option<Placed> {
        let path = own_path(mount.controllers.as_ref())?;
        Some(Placed {
            own_dir: dir_of(mount, &path)?,
            mount: mount.clone(),
        })
    };
    let unified = mounts.iter().find(|m| m.controllers.is_none());
    let v1: Vec<Placed> = mounts
        .iter()
        .filter(|m| m.controllers.is_some())
        .filter_map(place)
        .collect();
    if v1.is_empty() {
        let Some(unified) = unified else {
            return Err("no cgroup filesystem is mounted (looked in /proc/self/mountinfo); mount cgroup2 at /sys/fs/cgroup".into());
        };
        let placed = place(unified)
            .ok_or_else(|| "this process has no cgroup2 path in /proc/self/cgroup".to_owned())?;
        return Ok(Layout::Unified(placed));
    }
    Ok(Layout::Hybrid {
        v1,
        unified: unified.and_then(place),
    })
}

/// The layout of this host, as this process sees it.
pub fn detect() -> Result<Layout, String> {
    let read = |path: &Path| {
        std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
    };
    layout(
        &read(Path::new("/proc/self/mountinfo"))?,
        &read(Path::new("/proc/self/cgroup"))?,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hybrid host, as CI has: v1 controllers, cgroup2 at `unified` with none.
    const HYBRID_MOUNTS: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 31 0:33 / /sys/fs/cgroup/devices rw,relatime - cgroup cgroup rw,devices
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const HYBRID_CGROUP: &str = "\
9:name=systemd:/
8:pids:/
5:devices:/
4:memory:/jobs/abc
2:cpuacct:/
1:cpu:/
0::/
";

    #[test]
    fn a_hybrid_host_puts_limits_in_v1_and_the_gate_in_unified() {
        let layout = layout(HYBRID_MOUNTS, HYBRID_CGROUP).unwrap();
        let memory = layout.v1_with("memory").unwrap();
        assert_eq!(memory.own_dir, Path::new("/sys/fs/cgroup/memory/jobs/abc"));
        assert_eq!(
            layout.v1_with("cpu").unwrap().own_dir,
            Path::new("/sys/fs/cgroup/cpu")
        );
        assert!(layout.v1_with("pids").is_some());
        assert!(layout.v1_with("blkio").is_none());
        let Layout::Hybrid { unified, .. } = &layout else {
            panic!("{layout:?}")
        };
        assert_eq!(
            unified.as_ref().unwrap().own_dir,
            Path::new("/sys/fs/cgroup/unified")
        );
    }

    #[test]
    fn a_unified_host_under_systemd_places_us_in_our_service() {
        let mounts = "\
25 20 0:23 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";
        let layout = layout(mounts, "0::/system.slice/acceld.service\n").unwrap();
        assert_eq!(
            layout,
            Layout::Unified(Placed {
                mount: CgroupMount {
                    point: "/sys/fs/cgroup".into(),
                    root: "/".into(),
                    controllers: None,
                },
                own_dir: "/sys/fs/cgroup/system.slice/acceld.service".into(),
            })
        );
    }

    #[test]
    fn a_container_mount_root_is_taken_off_our_path_and_escapes_are_read() {
        let mounts = "\
30 20 0:25 /docker/c1 /sys/fs/cgroup\\040x ro,nosuid - cgroup2 cgroup2 rw
";
        let Layout::Unified(placed) = layout(mounts, "0::/docker/c1/inner\n").unwrap() else {
            panic!()
        };
        assert_eq!(placed.own_dir, Path::new("/sys/fs/cgroup x/inner"));
    }

    #[test]
    fn paths_outside_the_mount_or_not_plain_are_not_ours() {
        let mount = CgroupMount {
            point: "/sys/fs/cgroup".into(),
            root: "/docker/c1".into(),
            controllers: None,
        };
        assert_eq!(
            dir_of(&mount, "/docker/c10/x"),
            None,
            "a prefix of the name is not the parent"
        );
        assert_eq!(dir_of(&mount, "/docker/c1/../c2"), None);
        assert_eq!(
            dir_of(&mount, "/docker/c1/x"),
            Some(PathBuf::from("/sys/fs/cgroup/x"))
        );
        // A named v1 hierarchy is not mistaken for the unified one.
        let memberships = parse_proc_cgroup("9:name=systemd:/user.slice\n0::/svc\n");
        assert_eq!(memberships, [(Vec::<String>::new(), "/svc".to_owned())]);
    }

    #[test]
    fn combined_v1_controllers_and_no_cgroups_at_all() {
        let mounts = "\
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
";
        let layout = layout(mounts, "3:cpu,cpuacct:/x\n").unwrap();
        assert_eq!(
            layout.v1_with("cpuacct").unwrap().own_dir,
            Path::new("/sys/fs/cgroup/cpu,cpuacct/x")
        );
        let err = super::layout("1 0 0:1 / / rw - ext4 /dev/sda rw\n", "").unwrap_err();
        assert!(err.contains("no cgroup filesystem"), "{err}");
    }
}
