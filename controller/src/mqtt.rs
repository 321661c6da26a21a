//! skiffctl's broker connection: connect, subscribe and read until the broker
//! has delivered everything it had, publish and confirm.
//!
//! "Everything it had" is made exact without waiting a fixed time: after the
//! SUBACK, skiffctl publishes a marker to a topic of its own that it is also
//! subscribed to. The broker queues the retained (and session) messages
//! before the marker, so when the marker comes back nothing is left.

use crate::ConfigError;
use anyhow::{anyhow, bail, Result};
use clap::Args;
use rumqttc::{
    AsyncClient, Event, EventLoop, MqttOptions, NetworkOptions, Packet, Publish, QoS, SubscribeFilter,
    SubscribeReasonCode, Transport,
};
use skiff_common::protocol::{BrokerUrl, PACKET_LIMIT, TOPIC_PREFIX};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::time::{timeout_at, Instant};

#[derive(Args, Clone, Debug)]
pub struct BrokerArgs {
    /// Broker URL: mqtts://host[:port] (TLS, default port 8883) or mqtt://host[:port].
    #[arg(long, value_name = "URL")]
    pub broker: String,
    /// CA certificate that signed the broker's certificate (PEM); required for mqtts://.
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// skiffctl's client certificate (PEM); its CN is its user name in the broker's ACL.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub cert: Option<PathBuf>,
    /// The private key of --cert (PEM).
    #[arg(long, value_name = "FILE", requires = "cert")]
    pub tls_key: Option<PathBuf>,
    /// Seconds to wait for the broker to connect and to answer.
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    pub timeout: u64,
}

pub struct Conn {
    pub client: AsyncClient,
    eventloop: EventLoop,
    pub id: String,
    pub url: BrokerUrl,
    pub timeout: Duration,
}

/// A fresh client id, so concurrent skiffctl runs never kick each other off.
pub fn random_client_id() -> String {
    format!("skiffctl-{:016x}", rand::random::<u64>())
}

impl Conn {
    /// Connects and waits for the CONNACK. `clean = false` keeps a broker
    /// session under `client_id` between runs.
    pub async fn connect(args: &BrokerArgs, client_id: String, clean: bool) -> Result<Conn> {
        let url = BrokerUrl::try_from(args.broker.as_str()).map_err(ConfigError::from)?;
        let mut o = MqttOptions::new(client_id.clone(), url.host.clone(), url.port);
        o.set_clean_session(clean)
            .set_keep_alive(Duration::from_secs(30))
            .set_max_packet_size(PACKET_LIMIT, PACKET_LIMIT);
        match (url.tls, &args.ca) {
            (true, Some(ca)) => {
                let identity = match (&args.cert, &args.tls_key) {
                    (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
                    _ => None,
                };
                o.set_transport(Transport::tls(read(ca)?, identity, None));
            }
            (true, None) => {
                return Err(ConfigError(format!(
                    "{url} is TLS: --ca is needed (and --cert/--tls-key for a client certificate)"
                ))
                .into())
            }
            (false, _) if args.ca.is_some() || args.cert.is_some() => {
                return Err(ConfigError(format!(
                    "{url} is plain MQTT but TLS files were given; use mqtts://"
                ))
                .into())
            }
            (false, _) => {}
        }
        let (client, mut eventloop) = AsyncClient::new(o, 64);
        let mut net = NetworkOptions::new();
        net.set_connection_timeout(args.timeout.max(1));
        eventloop.set_network_options(net);
        let wait = Duration::from_secs(args.timeout.max(1));
        match tokio::time::timeout(wait, eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => {}
            Ok(Ok(other)) => bail!("unexpected first packet from {url}: {other:?}"),
            Ok(Err(e)) => bail!("cannot connect to {url}: {e}"),
            Err(_) => bail!("cannot connect to {url}: no answer within {}s", wait.as_secs()),
        }
        Ok(Conn { client, eventloop, id: client_id, url, timeout: wait })
    }

    /// The next event from the broker; a lost connection is an error.
    pub async fn poll(&mut self) -> Result<Event> {
        self.eventloop.poll().await.map_err(|e| anyhow!("connection to {} lost: {e}", self.url))
    }

    /// Subscribes to `filters` (QoS 1) and returns every message delivered
    /// until the broker has sent all it holds for them: retained messages and
    /// whatever a persistent session had queued.
    pub async fn collect(&mut self, filters: &[String]) -> Result<Vec<Publish>> {
        let marker = format!("{TOPIC_PREFIX}/{}/sync", self.id);
        let nonce = rand::random::<u64>().to_le_bytes().to_vec();
        let mut subs: Vec<_> =
            filters.iter().map(|f| SubscribeFilter::new(f.clone(), QoS::AtLeastOnce)).collect();
        subs.push(SubscribeFilter::new(marker.clone(), QoS::AtLeastOnce));
        self.client.subscribe_many(subs).await?;
        let deadline = Instant::now() + self.timeout;
        let mut out = Vec::new();
        loop {
            let event = timeout_at(deadline, self.poll())
                .await
                .map_err(|_| anyhow!("{} did not answer within {}s", self.url, self.timeout.as_secs()))??;
            match event {
                Event::Incoming(Packet::SubAck(a)) => {
                    for (code, f) in a.return_codes.iter().zip(filters.iter().chain([&marker])) {
                        if matches!(code, SubscribeReasonCode::Failure) {
                            bail!(
                                "{} refused the subscription to {f}: check its ACL for this client",
                                self.url
                            );
                        }
                    }
                    self.client.publish(marker.clone(), QoS::AtLeastOnce, false, nonce.clone()).await?;
                }
                Event::Incoming(Packet::Publish(p)) if p.topic == marker && p.payload[..] == nonce[..] => {
                    return Ok(out);
                }
                // A marker of an earlier run, queued in a persistent session.
                Event::Incoming(Packet::Publish(p)) if p.topic == marker => {}
                Event::Incoming(Packet::Publish(p)) => out.push(p),
                _ => {}
            }
        }
    }

    /// Waits until every `(topic, payload)` has come back on a subscription:
    /// proof the broker took it and lets it be read. Needs `collect` first.
    pub async fn confirm(&mut self, mut expected: Vec<(String, Vec<u8>)>) -> Result<()> {
        let deadline = Instant::now() + self.timeout;
        while !expected.is_empty() {
            let event = timeout_at(deadline, self.poll()).await.map_err(|_| {
                let topics: Vec<_> = expected.iter().map(|e| e.0.as_str()).collect();
                anyhow!(
                    "{} did not deliver {} back within {}s: is publishing there allowed for this client (ACL)?",
                    self.url,
                    topics.join(", "),
                    self.timeout.as_secs()
                )
            })??;
            if let Event::Incoming(Packet::Publish(p)) = event {
                expected.retain(|(t, b)| !(p.topic == *t && p.payload[..] == b[..]));
            }
        }
        Ok(())
    }

    /// Sends DISCONNECT and waits (briefly) until it is out.
    pub async fn close(mut self) {
        let _ = self.client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Ok(ev) = self.eventloop.poll().await {
                if matches!(ev, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                    break;
                }
            }
        })
        .await;
    }
}

fn read(p: &Path) -> Result<Vec<u8>> {
    Ok(crate::localfile::read(p, crate::localfile::CERT_LIMIT)?)
}
