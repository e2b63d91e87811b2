//! The callee an OpenTelemetry CLIENT or PRODUCER span names by its semantic-convention
//! attributes — one ranking for the server's OTLP decoders and the client crate's span
//! processor. The first present of: `peer.service` or `service.peer.name` (the service called,
//! as named), `db.system.name` or `db.system` (`db:<system>`, an uninstrumented database),
//! `messaging.system` (`mq:<system>`), `server.address` or the older `net.peer.name` (the host
//! called, as named: a service reached by its own name joins that service's node). Offered
//! attribute by attribute, so a decoder keeps no attribute list.

/// The best peer offered so far.
#[derive(Debug, Clone, Copy, Default)]
pub struct Peer<'a> {
    /// 0 for none; lower is preferred.
    rank: u8,
    prefix: &'static str,
    name: &'a str,
}

impl<'a> Peer<'a> {
    /// The rank and prefix of an attribute that names a peer.
    fn rank(key: &str) -> Option<(u8, &'static str)> {
        Some(match key {
            "peer.service" | "service.peer.name" => (1, ""),
            "db.system.name" | "db.system" => (2, "db:"),
            "messaging.system" => (3, "mq:"),
            "server.address" => (4, ""),
            "net.peer.name" => (5, ""),
            _ => return None,
        })
    }

    /// Whether attribute `key` can name a peer (a decoder reads the value only then).
    pub fn wants(key: &str) -> bool {
        Peer::rank(key).is_some()
    }

    /// Takes string attribute `key` = `value` if it names a better peer than the one held.
    pub fn offer(&mut self, key: &str, value: &'a str) {
        let Some((rank, prefix)) = Peer::rank(key) else { return };
        if !value.is_empty() && (self.rank == 0 || rank < self.rank) {
            *self = Peer { rank, prefix, name: value };
        }
    }

    /// The peer as its prefix and name (`None` for none).
    pub fn key(&self) -> Option<(&'static str, &'a str)> {
        (self.rank != 0).then_some((self.prefix, self.name))
    }
}
