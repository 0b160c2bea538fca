//! The rules a configuration must meet: every key's range, and how keys relate.

use std::time::Duration;

use skillmesh_protocol::MeshName;

use super::{Config, ConfigError, invalid};

impl Config {
    /// Checks every rule; the error names the first bad key and its value.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let n = &self.node;
        if n.name.is_empty()
            || n.name.len() > skillmesh_protocol::MAX_DISPLAY_NAME_LEN
            || n.name.chars().any(char::is_control)
        {
            return Err(invalid(
                "node.name",
                format!("{:?}", n.name),
                format!(
                    "must be 1 to {} printable bytes",
                    skillmesh_protocol::MAX_DISPLAY_NAME_LEN
                ),
            ));
        }

        let net = &self.network;
        for (i, a) in net.bootstrap.iter().enumerate() {
            if !a
                .iter()
                .any(|p| matches!(p, libp2p::multiaddr::Protocol::P2p(_)))
            {
                return Err(invalid(
                    &format!("network.bootstrap[{i}]"),
                    a,
                    "must end with /p2p/<peer id>",
                ));
            }
        }
        at_least("network.max_connections", net.max_connections, 1)?;
        at_least("network.max_pending", net.max_pending, 1)?;
        at_least("network.max_per_peer", net.max_per_peer, 1)?;
        if net.min_connections > net.max_connections {
            return Err(invalid(
                "network.min_connections",
                net.min_connections,
                format!(
                    "must not exceed network.max_connections ({})",
                    net.max_connections
                ),
            ));
        }
        duration_at_least(
            "network.idle_timeout",
            net.idle_timeout,
            Duration::from_secs(1),
        )?;
        if !net.ping_interval.is_zero() {
            duration_at_least(
                "network.ping_interval",
                net.ping_interval,
                Duration::from_secs(1),
            )?;
        }

        MeshName::new(self.mesh.name.clone())
            .map_err(|e| invalid("mesh.name", format!("{:?}", self.mesh.name), e.reason))?;
        if !self.mesh.psk.is_empty() && self.mesh.psk_bytes().is_none() {
            return Err(invalid(
                "mesh.psk",
                "<hidden>",
                format!(
                    "must be 64 hex digits, got {} characters",
                    self.mesh.psk.len()
                ),
            ));
        }

        let d = &self.dht;
        duration_at_least("dht.record_ttl", d.record_ttl, Duration::from_secs(60))?;
        if d.record_ttl > skillmesh_protocol::MAX_CARD_LIFETIME {
            return Err(invalid(
                "dht.record_ttl",
                humantime::format_duration(d.record_ttl),
                format!(
                    "must be at most {}",
                    humantime::format_duration(skillmesh_protocol::MAX_CARD_LIFETIME)
                ),
            ));
        }
        if d.republish_interval.is_zero() || d.republish_interval * 2 > d.record_ttl {
            return Err(invalid(
                "dht.republish_interval",
                humantime::format_duration(d.republish_interval),
                "must be above zero and at most half of dht.record_ttl, so records are renewed before they expire",
            ));
        }
        duration_at_least(
            "dht.query_timeout",
            d.query_timeout,
            Duration::from_millis(100),
        )?;
        duration_at_least(
            "dht.refresh_interval",
            d.refresh_interval,
            Duration::from_secs(10),
        )?;
        at_least("dht.max_records", d.max_records, 16)?;

        let c = &self.calls;
        at_least("calls.max_inbound", c.max_inbound, 1)?;
        at_least("calls.keep_results", c.keep_results, 1)?;
        duration_at_least(
            "calls.keep_results_for",
            c.keep_results_for,
            Duration::from_secs(1),
        )?;
        at_least("calls.max_inbound_per_peer", c.max_inbound_per_peer, 1)?;
        at_least("calls.rate_per_peer", c.rate_per_peer, 1)?;
        if c.burst_per_peer < c.rate_per_peer {
            return Err(invalid(
                "calls.burst_per_peer",
                c.burst_per_peer,
                format!("must be at least calls.rate_per_peer ({})", c.rate_per_peer),
            ));
        }
        duration_at_least("calls.timeout", c.timeout, Duration::from_millis(10))?;
        if c.timeout > skillmesh_protocol::MAX_CALL_WINDOW {
            return Err(invalid(
                "calls.timeout",
                humantime::format_duration(c.timeout),
                format!(
                    "must be at most {}",
                    humantime::format_duration(skillmesh_protocol::MAX_CALL_WINDOW)
                ),
            ));
        }
        if c.max_skew > Duration::from_secs(600) {
            return Err(invalid(
                "calls.max_skew",
                humantime::format_duration(c.max_skew),
                "must be at most 10m",
            ));
        }

        let g = &self.gossip;
        at_least("gossip.mesh_n_low", g.mesh_n_low, 1)?;
        if !(g.mesh_n_low <= g.mesh_n && g.mesh_n <= g.mesh_n_high) {
            return Err(invalid(
                "gossip.mesh_n",
                g.mesh_n,
                format!(
                    "must satisfy mesh_n_low ({}) <= mesh_n <= mesh_n_high ({})",
                    g.mesh_n_low, g.mesh_n_high
                ),
            ));
        }
        duration_at_least("gossip.heartbeat", g.heartbeat, Duration::from_millis(10))?;
        at_least("gossip.max_events_per_sec", g.max_events_per_sec, 1)?;
        duration_at_least(
            "gossip.presence_interval",
            g.presence_interval,
            Duration::from_secs(1),
        )?;

        let r = &self.relay;
        if r.enabled {
            at_least("relay.max_reservations", r.max_reservations, 1)?;
            at_least("relay.max_circuits", r.max_circuits, 1)?;
            at_least("relay.max_circuit_bytes", r.max_circuit_bytes, 64 * 1024)?;
            duration_at_least(
                "relay.max_circuit_duration",
                r.max_circuit_duration,
                Duration::from_secs(10),
            )?;
        }
        mail_ttl("relay.max_mail_ttl", r.max_mail_ttl)?;
        duration_at_least(
            "nat.probe_interval",
            self.nat.probe_interval,
            Duration::from_secs(10),
        )?;
        for (key, list) in [
            ("nat.relays", &self.nat.relays),
            ("mail.mailboxes", &self.mail.mailboxes),
        ] {
            for (i, a) in list.iter().enumerate() {
                if !matches!(a.iter().last(), Some(libp2p::multiaddr::Protocol::P2p(_))) {
                    return Err(invalid(
                        &format!("{key}[{i}]"),
                        a,
                        "must end with /p2p/<peer id>",
                    ));
                }
            }
        }
        let m = &self.mail;
        if m.max_mailboxes == 0 && !m.mailboxes.is_empty() {
            return Err(invalid(
                "mail.max_mailboxes",
                m.max_mailboxes,
                "must be at least 1 when mail.mailboxes lists any",
            ));
        }
        if m.max_mailboxes as usize > skillmesh_protocol::MAX_CARD_MAILBOXES {
            return Err(invalid(
                "mail.max_mailboxes",
                m.max_mailboxes,
                format!("must be at most {}", skillmesh_protocol::MAX_CARD_MAILBOXES),
            ));
        }
        mail_ttl("mail.ttl", m.ttl)?;
        duration_at_least(
            "mail.fetch_interval",
            m.fetch_interval,
            Duration::from_millis(100),
        )?;
        duration_at_least(
            "mail.direct_timeout",
            m.direct_timeout,
            Duration::from_millis(100),
        )?;
        at_least("mail.max_inbox", m.max_inbox, 1)?;

        let s = &self.store;
        for (k, v) in [
            ("store.max_cards", s.max_cards),
            ("store.max_skills", s.max_skills),
            ("store.max_call_log", s.max_call_log),
            ("store.mail_per_recipient", s.mail_per_recipient),
            ("store.mail_bytes_per_recipient", s.mail_bytes_per_recipient),
            ("store.mail_per_sender", s.mail_per_sender),
            ("store.mail_bytes_per_sender", s.mail_bytes_per_sender),
            ("store.mail_bytes_total", s.mail_bytes_total),
        ] {
            at_least(k, v, 1)?;
        }
        if !self.api.listen.ip().is_loopback() {
            return Err(invalid(
                "api.listen",
                self.api.listen,
                "must be a loopback address: the control API is for this machine only",
            ));
        }
        for (i, decl) in self.skills.iter().enumerate() {
            if let Err(e) = decl.resolve() {
                return Err(invalid(
                    &format!("skills[{i}].{}", e.field),
                    &decl.name,
                    e.reason,
                ));
            }
            if self.skills[..i].iter().any(|d| d.name == decl.name) {
                return Err(invalid(
                    &format!("skills[{i}].name"),
                    &decl.name,
                    "declared twice",
                ));
            }
        }
        if s.max_skills > skillmesh_protocol::MAX_SKILLS_PER_CARD as u64 {
            return Err(invalid(
                "store.max_skills",
                s.max_skills,
                format!(
                    "must be at most {} (skills per card)",
                    skillmesh_protocol::MAX_SKILLS_PER_CARD
                ),
            ));
        }
        Ok(())
    }
}

fn at_least<T: PartialOrd + std::fmt::Display>(key: &str, v: T, min: T) -> Result<(), ConfigError> {
    if v < min {
        return Err(invalid(key, &v, format!("must be at least {min}")));
    }
    Ok(())
}

fn duration_at_least(key: &str, v: Duration, min: Duration) -> Result<(), ConfigError> {
    if v < min {
        return Err(invalid(
            key,
            humantime::format_duration(v),
            format!("must be at least {}", humantime::format_duration(min)),
        ));
    }
    Ok(())
}

/// A mail TTL: at least a minute, at most the protocol's [`skillmesh_protocol::MAX_MAIL_TTL`].
fn mail_ttl(key: &str, v: Duration) -> Result<(), ConfigError> {
    duration_at_least(key, v, Duration::from_secs(60))?;
    let max = skillmesh_protocol::MAX_MAIL_TTL;
    if v > max {
        return Err(invalid(
            key,
            humantime::format_duration(v),
            format!("must be at most {}", humantime::format_duration(max)),
        ));
    }
    Ok(())
}
