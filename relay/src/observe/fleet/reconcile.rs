//! Reconciling what should be observed with what is: a pure function from
//! the wanted set (selected running containers) and the attached set to
//! the actions that make them agree, so the rules (a restart is a detach
//! and an attach, a rename only relabels, the cap refuses the rest) are
//! tested without a daemon or a kernel.

use std::collections::BTreeMap;

use crate::observe::discover::Network;

/// A selected running container, by id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Want {
    pub name: String,
    pub pid: u32,
    pub network: Network,
}

/// An attached container (or one being attached), by id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Have {
    pub name: String,
    pub pid: u32,
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
            Some(want) if want.network == Network::Own && want.pid == attached.pid => {
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
            want.network == Network::Own && have.get(*id).is_none_or(|h| h.pid != want.pid)
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
                        pid: *pid,
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
                        pid: *pid,
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
}
