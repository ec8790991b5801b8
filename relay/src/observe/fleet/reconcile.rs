//! Reconciling what should be observed with what is: a pure function from
//! the wanted set (selected running containers) and the attached set to
//! the actions that make them agree, so the rules (a restart is a detach
//! and an attach, a rename only relabels, the cap refuses the rest) are
//! tested without a daemon or a kernel; and [`share_namespaces`], which
//! leaves one container per network namespace to be attached.

use std::collections::{BTreeMap, HashSet};

use crate::observe::discover::{Container, Network, containerd};

/// A selected running container, by key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Want {
    pub name: String,
    /// Its process and namespace ([`Container::instance`]).
    pub instance: (u32, u64),
    pub network: Network,
}

/// An attached container (or one being attached), by key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Have {
    pub name: String,
    pub instance: (u32, u64),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Load and attach the programs in the container's namespace.
    Attach(String),
    /// Drop its programs and series: stopped, no longer selected, now on
    /// the host's network, or restarted (another pid: a new namespace).
    Detach(String),
    /// Same namespace, new name: the series move to the new name.
    Rename { id: String, to: String },
    /// Over the cap: not attached (yet; a slot that frees takes it).
    Refuse(String),
}

/// The actions, detaches first, then renames, attaches and refusals; the
/// cap counts what stays attached, and the candidates take free slots in
/// name order (so which ones get in does not depend on hash order).
pub fn plan(
    wanted: &BTreeMap<String, Want>,
    have: &BTreeMap<String, Have>,
    limit: usize,
) -> Vec<Action> {
    let mut detach = Vec::new();
    let mut rename = Vec::new();
    let mut kept = 0usize;
    for (id, attached) in have {
        match wanted.get(id) {
            Some(want) if want.network == Network::Own && want.instance == attached.instance => {
                kept += 1;
                if want.name != attached.name {
                    rename.push(Action::Rename {
                        id: id.clone(),
                        to: want.name.clone(),
                    });
                }
            }
            _ => detach.push(Action::Detach(id.clone())),
        }
    }
    let mut candidates: Vec<(&String, &Want)> = wanted
        .iter()
        .filter(|(id, want)| {
            want.network == Network::Own
                && have.get(*id).is_none_or(|h| h.instance != want.instance)
        })
        .collect();
    candidates.sort_by(|a, b| (&a.1.name, a.0).cmp(&(&b.1.name, b.0)));
    let mut actions = detach;
    actions.extend(rename);
    for (id, _) in candidates {
        if kept < limit {
            kept += 1;
            actions.push(Action::Attach(id.clone()));
        } else {
            actions.push(Action::Refuse(id.clone()));
        }
    }
    actions
}

/// One container per network namespace keeps `Own`: of those with the
/// same inode, the first by source (a daemon's names over the kernel's),
/// then a pod's sandbox, then key; the others become `Shared`. One in the
/// host's namespace (`host_netns`) is `Host`. An inode of 0 (unknown) is
/// left as the source said.
pub fn share_namespaces(containers: &mut BTreeMap<String, Container>, host_netns: u64) {
    let mut owned: HashSet<u64> = HashSet::new();
    let mut candidates: Vec<(&String, &Container)> = containers
        .iter()
        .filter(|(_, c)| c.network == Network::Own && c.netns != 0)
        .collect();
    candidates.sort_by_key(|(key, c)| (c.source, !containerd::is_sandbox(c), *key));
    let mut change: Vec<(String, Network)> = Vec::new();
    for (key, c) in candidates {
        if c.netns == host_netns {
            change.push((key.clone(), Network::Host));
        } else if !owned.insert(c.netns) {
            change.push((key.clone(), Network::Shared));
        }
    }
    for (key, network) in change {
        if let Some(c) = containers.get_mut(&key) {
            c.network = network;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn want(entries: &[(&str, &str, u32, Network)]) -> BTreeMap<String, Want> {
        entries
            .iter()
            .map(|(id, name, pid, network)| {
                (
                    id.to_string(),
                    Want {
                        name: name.to_string(),
                        instance: (*pid, 4026532000 + u64::from(*pid)),
                        network: network.clone(),
                    },
                )
            })
            .collect()
    }

    fn have(entries: &[(&str, &str, u32)]) -> BTreeMap<String, Have> {
        entries
            .iter()
            .map(|(id, name, pid)| {
                (
                    id.to_string(),
                    Have {
                        name: name.to_string(),
                        instance: (*pid, 4026532000 + u64::from(*pid)),
                    },
                )
            })
            .collect()
    }

    use Action::*;
    use Network::Own;

    #[test]
    fn new_containers_attach_and_gone_ones_detach() {
        let actions = plan(
            &want(&[("a", "web", 10, Own), ("b", "api", 11, Own)]),
            &have(&[("a", "web", 10), ("c", "db", 12)]),
            256,
        );
        assert_eq!(actions, vec![Detach("c".into()), Attach("b".into())]);
    }

    #[test]
    fn agreement_needs_nothing() {
        let wanted = want(&[("a", "web", 10, Own)]);
        assert_eq!(plan(&wanted, &have(&[("a", "web", 10)]), 256), vec![]);
        assert_eq!(plan(&BTreeMap::new(), &BTreeMap::new(), 256), vec![]);
    }

    #[test]
    fn a_restart_seen_only_in_a_listing_is_a_detach_and_an_attach() {
        // dockerd was away while the container restarted: same id, new pid.
        let actions = plan(
            &want(&[("a", "web", 20, Own)]),
            &have(&[("a", "web", 10)]),
            256,
        );
        assert_eq!(actions, vec![Detach("a".into()), Attach("a".into())]);
    }

    #[test]
    fn a_rename_moves_the_series_without_reattaching() {
        let actions = plan(
            &want(&[("a", "web2", 10, Own)]),
            &have(&[("a", "web", 10)]),
            256,
        );
        assert_eq!(
            actions,
            vec![Rename {
                id: "a".into(),
                to: "web2".into()
            }]
        );
    }

    #[test]
    fn containers_without_their_own_namespace_are_never_attached() {
        let wanted = want(&[
            ("h", "hostnet", 10, Network::Host),
            ("n", "nonet", 11, Network::None),
            ("s", "sidecar", 12, Network::Shared),
        ]);
        assert_eq!(plan(&wanted, &BTreeMap::new(), 256), vec![]);
        // One that was attached and now is on the host's network goes.
        let actions = plan(&wanted, &have(&[("h", "hostnet", 10)]), 256);
        assert_eq!(actions, vec![Detach("h".into())]);
    }

    #[test]
    fn the_cap_refuses_beyond_it_in_name_order_and_a_freed_slot_is_taken() {
        let wanted = want(&[("1", "c", 1, Own), ("2", "a", 2, Own), ("3", "b", 3, Own)]);
        let actions = plan(&wanted, &BTreeMap::new(), 2);
        assert_eq!(
            actions,
            vec![Attach("2".into()), Attach("3".into()), Refuse("1".into())]
        );
        // `a` stopped: its slot goes to the refused one.
        let wanted = want(&[("1", "c", 1, Own), ("3", "b", 3, Own)]);
        let actions = plan(&wanted, &have(&[("2", "a", 2), ("3", "b", 3)]), 2);
        assert_eq!(actions, vec![Detach("2".into()), Attach("1".into())]);
    }

    #[test]
    fn attached_ones_keep_their_slot_under_the_cap() {
        let wanted = want(&[("1", "a", 1, Own), ("2", "z", 2, Own)]);
        let actions = plan(&wanted, &have(&[("2", "z", 2)]), 1);
        assert_eq!(actions, vec![Refuse("1".into())]);
    }

    fn found(
        key: &str,
        source: Source,
        netns: u64,
        labels: &[(&str, &str)],
    ) -> (String, Container) {
        (
            key.to_string(),
            Container {
                key: key.to_string(),
                source,
                id: key.to_string(),
                name: key.to_string(),
                image: String::new(),
                labels: labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                pid: 1,
                netns,
                ns_path: None,
                network: Own,
            },
        )
    }

    fn networks(containers: &BTreeMap<String, Container>) -> Vec<(&str, Network)> {
        containers
            .iter()
            .map(|(k, c)| (k.as_str(), c.network.clone()))
            .collect()
    }

    use crate::observe::discover::Source;

    #[test]
    fn a_pod_is_attached_once_through_its_sandbox() {
        let sandbox = [("io.cri-containerd.kind", "sandbox")];
        let mut found: BTreeMap<String, Container> = [
            found(
                "a-app",
                Source::Containerd,
                7,
                &[("io.cri-containerd.kind", "container")],
            ),
            found("z-pause", Source::Containerd, 7, &sandbox),
            found("other", Source::Containerd, 8, &[]),
        ]
        .into_iter()
        .collect();
        share_namespaces(&mut found, 1);
        assert_eq!(
            networks(&found),
            vec![("a-app", Network::Shared), ("other", Own), ("z-pause", Own)]
        );
    }

    #[test]
    fn a_daemon_names_a_namespace_the_kernel_also_shows_and_the_host_is_the_host() {
        let mut found: BTreeMap<String, Container> = [
            found("netns:7", Source::Netns, 7, &[]),
            found("d7", Source::Docker, 7, &[]),
            found("hostnet", Source::Containerd, 1, &[]),
            found("unknown", Source::Containerd, 0, &[]),
        ]
        .into_iter()
        .collect();
        share_namespaces(&mut found, 1);
        assert_eq!(
            networks(&found),
            vec![
                ("d7", Own),
                ("hostnet", Network::Host),
                ("netns:7", Network::Shared),
                ("unknown", Own)
            ]
        );
    }
}
