//! The [`Node`] handle: what an agent process holds to use the network.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use serde_bytes::ByteBuf;
use serde_json::Value;
use skillmesh_protocol::envelope::{self, Checks};
use skillmesh_protocol::{
    Call, CallId, CallResult, CallStatus, Event, MAX_CALL_ARGS_BYTES, MAX_CALL_WINDOW,
    MAX_OUTPUT_BYTES, MeshName, Mode, SigningKey, SkillName, SkillSpec, Tag, Timestamp,
    ValidationError, from_cbor, to_cbor,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::async_calls::AsyncCalls;
use crate::behaviour::{TransportKind, build_swarm};
use crate::call_log::CallLog;
use crate::calls::{Inbound, final_state, peek, read_result};
use crate::config::{Config, default_data_dir};
use crate::discovery::{Found, Query, remember_card};
use crate::error::{Error, Result};
use crate::event_loop::{COMMAND_BUFFER, Command, EventLoop, NatStatus, Parts, PublishReport};
use crate::events::{PeerInfo, Subscription};
use crate::identity::Identity;
use crate::mail::service::MailService;
use crate::mail::{Inbox, Message, Messenger, SendReport};
use crate::metrics::{Metrics, NodeMetrics};
use crate::pipe::{self, Activity, Pipes, Request, ServeLimits};
use crate::skills::{Handler, Registered, Registry, SkillHandler, StreamHandler};
use crate::store::{CallLogEntry, CallState, Direction, KeepResults, STORE_FILE, Store};

/// How long `build` waits for a first connection when bootstrap peers are configured.
const BOOTSTRAP_WAIT: Duration = Duration::from_secs(10);

/// Builds a [`Node`] from a [`Config`].
pub struct NodeBuilder {
    config: Config,
    data_dir: Option<PathBuf>,
    identity: Option<Identity>,
    transport: TransportKind,
}

impl NodeBuilder {
    /// Where the node keeps its key and store (default: the per-user data dir).
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.data_dir = Some(dir.into());
        self
    }

    /// Runs over another transport, e.g. the in-process memory transport (listen on
    /// `/memory/0`).
    pub fn transport(mut self, kind: TransportKind) -> Self {
        self.transport = kind;
        self
    }

    /// Uses this identity instead of the one in the data dir.
    pub fn identity(mut self, identity: Identity) -> Self {
        self.identity = Some(identity);
        self
    }

    /// Starts the node: loads or creates its identity, opens its store, listens, and connects
    /// to the bootstrap peers. Returns once it listens (and, with bootstrap peers, once it is
    /// connected to one or [`BOOTSTRAP_WAIT`] has passed).
    pub async fn build(self) -> Result<Node> {
        let config = self.config;
        config.validate()?;
        let data_dir = match self.data_dir {
            Some(d) => d,
            None => default_data_dir().ok_or_else(|| {
                Error::Invalid(ValidationError::new(
                    "data_dir",
                    "no home directory; set a data dir",
                ))
            })?,
        };
        std::fs::create_dir_all(&data_dir).map_err(|e| {
            Error::Invalid(ValidationError::new(
                "data_dir",
                format!("cannot create {}: {e}", data_dir.display()),
            ))
        })?;
        let identity = match self.identity {
            Some(id) => id,
            None => Identity::load_or_create(&data_dir)?.0,
        };
        let store = Store::open(&data_dir.join(STORE_FILE), config.store.clone()).await?;

        let mut swarm = build_swarm(identity.keypair().clone(), &config, self.transport)?;
        let private = config.mesh.psk_bytes().is_some();
        for addr in &config.network.listen {
            if private && addr.iter().any(|p| matches!(p, Protocol::QuicV1)) {
                tracing::warn!(%addr, "QUIC is off in a private mesh (pnet needs TCP); not listening there");
                continue;
            }
            probe_port(addr)?;
            swarm
                .listen_on(addr.clone())
                .map_err(|e| Error::Transport(format!("cannot listen on {addr}: {e}")))?;
        }
        let mut bootstrap = HashSet::new();
        for addr in &config.network.bootstrap {
            let Some(Protocol::P2p(peer)) = addr.iter().last() else {
                continue;
            };
            bootstrap.insert(peer);
            swarm.behaviour_mut().kad.add_address(&peer, addr.clone());
            if let Err(e) = swarm.dial(addr.clone()) {
                tracing::warn!(%addr, "cannot dial bootstrap peer: {e}");
            }
        }

        let registry = Registry::default();
        let signing = identity.signing_key().clone();
        let log = CallLog::start(store.clone());
        let metrics = Metrics::new();
        let async_calls = AsyncCalls::new(
            signing.clone(),
            store.clone(),
            log.clone(),
            KeepResults {
                count: config.calls.keep_results,
                max_age: config.calls.keep_results_for,
            },
        );
        let inbound = Arc::new(Inbound::new(
            signing.clone(),
            registry.clone(),
            &config.calls,
            log.clone(),
            metrics.node.clone(),
            async_calls.clone(),
        ));
        let config = Arc::new(config);
        let (tx, rx) = mpsc::channel(COMMAND_BUFFER);
        // Every log line of this node names it: tests and netsim run many nodes in one process.
        let span = tracing::info_span!("node", peer = %short_id(&signing.peer_id()));
        let control = swarm.behaviour().streams.control();
        let incoming =
            swarm.behaviour_mut().streams.incoming().ok_or_else(|| {
                Error::Transport("call pipes are served once per swarm".to_owned())
            })?;
        let activity = Arc::new(Activity::default());
        let (stop_serving, serving) = watch::channel(false);
        tokio::spawn(tracing::Instrument::instrument(
            pipe::serve(
                incoming,
                inbound.clone(),
                activity.clone(),
                ServeLimits::new(config.calls.max_inbound, config.calls.max_inbound_per_peer),
                serving,
            ),
            span.clone(),
        ));
        let pipes = Pipes::new(control, signing.clone(), activity.clone(), tx.downgrade());
        let secret = identity
            .keypair()
            .clone()
            .try_into_ed25519()
            .map_err(|_| Error::Transport("the identity is not an Ed25519 key".to_owned()))?;
        let (messenger, prekeys) = Messenger::load(
            signing.clone(),
            secret.secret().as_ref(),
            store.clone(),
            config.clone(),
            tx.downgrade(),
            async_calls.clone(),
        )
        .await?;
        let mail = MailService::start(
            store.clone(),
            messenger.clone(),
            config.relay.enabled && config.relay.mailbox,
            config.relay.max_mail_ttl,
        );
        let event_loop = EventLoop::new(
            swarm,
            rx,
            Parts {
                activity,
                stop_serving,
                signing: signing.clone(),
                registry: registry.clone(),
                config: config.clone(),
                bootstrap: bootstrap.clone(),
                metrics: metrics.node.clone(),
                p2p_metrics: metrics.libp2p,
                mail,
                prekeys,
            },
        );
        let task = tokio::spawn(tracing::Instrument::instrument(event_loop.run(), span));
        let fetcher = tokio::spawn(messenger.clone().run_fetcher());
        let node = Node {
            inner: Arc::new(Inner {
                peer_id: signing.peer_id(),
                signing,
                mesh: config.mesh_name(),
                config,
                registry,
                store,
                commands: tx,
                log,
                inbound: inbound.clone(),
                pipes,
                metrics: metrics.node,
                registry_metrics: metrics.registry,
                event_seq: AtomicU64::new(Timestamp::now().as_millis()),
                messenger,
                fetcher: Mutex::new(Some(fetcher)),
                task: Mutex::new(Some(task)),
                outbound: Mutex::default(),
                async_calls: async_calls.clone(),
            }),
        };
        // Calls a previous run accepted and never finished: their callers hear "interrupted".
        tokio::spawn(async_calls.recover());
        let listening = node.request(|reply| Command::ListenAddrs { reply });
        tokio::time::timeout(Duration::from_secs(5), listening)
            .await
            .map_err(|_| Error::Transport("no listen address came up within 5 s".to_owned()))??;
        if !bootstrap.is_empty() {
            let connected = node.request(|reply| Command::WaitConnected { reply });
            if tokio::time::timeout(BOOTSTRAP_WAIT, connected)
                .await
                .is_err()
            {
                tracing::warn!("no bootstrap peer answered within {BOOTSTRAP_WAIT:?}; continuing");
            }
        }
        let _ = node
            .request(|reply| Command::Republish { reply: Some(reply) })
            .await;
        Ok(node)
    }
}

/// Fails if a fixed port in `addr` is taken. libp2p listens with `SO_REUSEPORT`, so a second
/// node on a busy port would share it silently instead of failing; a plain socket finds out.
fn probe_port(addr: &Multiaddr) -> Result<()> {
    let mut ip = None;
    for p in addr.iter() {
        match p {
            Protocol::Ip4(a) => ip = Some(std::net::IpAddr::V4(a)),
            Protocol::Ip6(a) => ip = Some(std::net::IpAddr::V6(a)),
            Protocol::Tcp(port) if port != 0 => {
                if let Some(ip) = ip
                    && let Err(e) = std::net::TcpListener::bind((ip, port))
                {
                    return Err(Error::Transport(format!("cannot listen on {addr}: {e}")));
                }
            }
            Protocol::Udp(port) if port != 0 => {
                if let Some(ip) = ip
                    && let Err(e) = std::net::UdpSocket::bind((ip, port))
                {
                    return Err(Error::Transport(format!("cannot listen on {addr}: {e}")));
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// Options of one call.
#[derive(Clone, Debug)]
pub struct CallOptions {
    /// Versions of the skill accepted (default: any).
    pub version_req: semver::VersionReq,
    /// How long to wait for the result (default: `calls.timeout` of the config).
    pub timeout: Option<Duration>,
    /// A grant envelope from the skill's owner, for skills shared by grant.
    pub grant: Option<Vec<u8>>,
}

impl Default for CallOptions {
    fn default() -> Self {
        CallOptions {
            version_req: semver::VersionReq::STAR,
            timeout: None,
            grant: None,
        }
    }
}

struct Inner {
    peer_id: PeerId,
    signing: SigningKey,
    mesh: MeshName,
    config: Arc<Config>,
    registry: Registry,
    store: Store,
    commands: mpsc::Sender<Command>,
    log: CallLog,
    inbound: Arc<Inbound>,
    pipes: Arc<Pipes>,
    metrics: NodeMetrics,
    registry_metrics: Arc<prometheus_client::registry::Registry>,
    event_seq: AtomicU64,
    messenger: Arc<Messenger>,
    fetcher: Mutex<Option<JoinHandle<()>>>,
    task: Mutex<Option<JoinHandle<()>>>,
    async_calls: Arc<AsyncCalls>,
    /// Our calls under way that take longer than one answer (streams), by id: what
    /// [`Node::cancel_call`] finds before the call log has them.
    outbound: Mutex<HashMap<CallId, PeerId>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(f) = self
            .fetcher
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            f.abort();
        }
    }
}

/// A running skillmesh node. Cheap to clone; every clone drives the same node. The node stops
/// when [`Node::shutdown`] is called or the last clone is dropped.
#[derive(Clone)]
pub struct Node {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("peer_id", &self.inner.peer_id)
            .finish_non_exhaustive()
    }
}

impl Node {
    /// Starts building a node.
    pub fn builder(config: Config) -> NodeBuilder {
        NodeBuilder {
            config,
            data_dir: None,
            identity: None,
            transport: TransportKind::default(),
        }
    }

    /// This agent's address.
    pub fn peer_id(&self) -> PeerId {
        self.inner.peer_id
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The node's store.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    pub(crate) fn signing(&self) -> &SigningKey {
        &self.inner.signing
    }

    pub(crate) fn inbound(&self) -> &Arc<Inbound> {
        &self.inner.inbound
    }

    pub(crate) fn pipes(&self) -> &Arc<Pipes> {
        &self.inner.pipes
    }

    pub(crate) fn log(&self) -> &CallLog {
        &self.inner.log
    }

    pub(crate) fn async_calls(&self) -> &Arc<AsyncCalls> {
        &self.inner.async_calls
    }

    /// The callee of our call `id`, while it is under way.
    pub(crate) fn outbound_peer(&self, id: CallId) -> Option<PeerId> {
        let map = self
            .inner
            .outbound
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        map.get(&id).copied()
    }

    /// Lists our call `id` as under way until the guard drops.
    pub(crate) fn track_outbound(&self, id: CallId, peer: PeerId) -> OutboundGuard {
        let mut map = self
            .inner
            .outbound
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        // Bounded by the calls a node can have under way: each holds a pipe tag or a task.
        map.insert(id, peer);
        OutboundGuard {
            node: self.clone(),
            id,
        }
    }

    async fn request<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .commands
            .send(make(tx))
            .await
            .map_err(|_| Error::ShutDown)?;
        rx.await.map_err(|_| Error::ShutDown)
    }

    /// Addresses the node listens on, with `/p2p/<peer id>` appended: what others bootstrap from.
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>> {
        let addrs = self.request(|reply| Command::ListenAddrs { reply }).await?;
        Ok(addrs
            .into_iter()
            .map(|a| match a.iter().last() {
                Some(Protocol::P2p(_)) => a,
                _ => a.with(Protocol::P2p(self.inner.peer_id)),
            })
            .collect())
    }

    /// Connects to an address (ending in `/p2p/<peer id>` to check who answers).
    pub async fn dial(&self, addr: Multiaddr) -> Result<()> {
        self.request(|reply| Command::Dial { addr, reply }).await?
    }

    /// Serves a skill: saves its spec, and announces it (provider records for its name and
    /// tags, and a new signed card) in the DHT. Registering a name again replaces it.
    pub async fn register_skill(
        &self,
        spec: SkillSpec,
        handler: impl SkillHandler,
    ) -> Result<PublishReport> {
        self.register_shared(spec, Arc::new(handler)).await
    }

    /// [`Node::register_skill`] with a shared handler (e.g. a config-declared backing).
    pub async fn register_shared(
        &self,
        spec: SkillSpec,
        handler: Arc<dyn SkillHandler>,
    ) -> Result<PublishReport> {
        self.register_handler(spec, Handler::Unary(handler)).await
    }

    /// Serves a stream-mode skill: the handler returns a stream of chunks per call.
    pub async fn register_stream(
        &self,
        spec: SkillSpec,
        handler: impl StreamHandler,
    ) -> Result<PublishReport> {
        self.register_handler(spec, Handler::Stream(Arc::new(handler)))
            .await
    }

    /// Serves a skill with a handler of its mode (see [`Handler`]).
    pub async fn register_handler(
        &self,
        spec: SkillSpec,
        handler: Handler,
    ) -> Result<PublishReport> {
        let registered = Registered::new(spec.clone(), handler)?;
        self.inner.store.put_skill(spec.clone()).await?;
        {
            let mut map = self
                .inner
                .registry
                .write()
                .unwrap_or_else(|e| e.into_inner());
            map.insert(spec.name.clone(), Arc::new(registered));
        }
        self.request(|reply| Command::Republish { reply: Some(reply) })
            .await
    }

    /// Stops serving a skill and withdraws its announcements; false if it was not served.
    pub async fn unregister_skill(&self, name: &str) -> Result<bool> {
        let name = SkillName::new(name)?;
        let removed = {
            let mut map = self
                .inner
                .registry
                .write()
                .unwrap_or_else(|e| e.into_inner());
            map.remove(&name).is_some()
        };
        self.inner.store.remove_skill(name).await?;
        self.request(|reply| Command::Republish { reply: Some(reply) })
            .await?;
        Ok(removed)
    }

    /// The skills this node serves.
    pub fn skills(&self) -> Vec<SkillSpec> {
        crate::skills::specs(&self.inner.registry)
    }

    /// Agents serving a skill of this name, with their verified cards.
    pub async fn find_skill(&self, name: &str) -> Result<Vec<Found>> {
        self.find(Query::Skill(SkillName::new(name)?)).await
    }

    /// Provider lookups (skill and tag searches) this node has finished, and the DHT requests
    /// they took.
    pub fn lookup_stats(&self) -> LookupStats {
        let m = &self.inner.metrics;
        LookupStats {
            lookups: m.lookups.get(),
            requests: m.lookup_requests.get(),
            failures: m.lookup_failures.get(),
        }
    }

    /// Agents serving a skill with this tag.
    pub async fn find_tag(&self, tag: &str) -> Result<Vec<Found>> {
        self.find(Query::Tag(Tag::new(tag)?)).await
    }

    /// Looks a query up in the DHT: providers, then their cards, verified. `NotFound` when no
    /// agent with a valid card answers it.
    pub async fn find(&self, query: Query) -> Result<Vec<Found>> {
        let timeout = self.inner.config.dht.query_timeout;
        let key = query.key();
        let providers = tokio::time::timeout(
            timeout,
            self.request(|reply| Command::FindProviders {
                key,
                counted: true,
                reply,
            }),
        )
        .await
        .map_err(|_| Error::Timeout(timeout))??;
        tracing::debug!(%query, providers = providers.len(), "providers found");
        let cards = providers.into_iter().map(|(peer, addrs)| async move {
            let card = tokio::time::timeout(
                timeout,
                self.request(|reply| Command::GetCard { peer, addrs, reply }),
            )
            .await;
            (peer, card)
        });
        let mut found = Vec::new();
        for (peer, card) in libp2p::futures::future::join_all(cards).await {
            let (card, bytes) = match card {
                Ok(Ok(Some(c))) => c,
                Ok(Ok(None)) => {
                    tracing::debug!(%peer, "provider without a valid card, from it or the DHT");
                    continue;
                }
                Ok(Err(e)) => {
                    tracing::debug!(%peer, "provider's card not fetched: {e}");
                    continue;
                }
                Err(_) => {
                    tracing::debug!(%peer, "provider's card not fetched in {timeout:?}");
                    continue;
                }
            };
            let skills: Vec<SkillSpec> = card
                .skills
                .iter()
                .filter(|s| query.matches(s))
                .cloned()
                .collect();
            if skills.is_empty() {
                continue;
            }
            self.remember_card(&card, bytes).await;
            found.push(Found { peer, card, skills });
        }
        if found.is_empty() {
            return Err(Error::NotFound(query.to_string()));
        }
        Ok(found)
    }

    async fn remember_card(&self, card: &skillmesh_protocol::AgentCard, envelope: Vec<u8>) {
        if card.peer_id != self.inner.peer_id {
            remember_card(&self.inner.commands, &self.inner.store, card, envelope).await;
        }
    }

    /// A call of `mode` to `peer`, ready to sign, and how long its caller waits for an answer.
    pub(crate) fn new_call(
        &self,
        peer: PeerId,
        skill: &str,
        args: &Value,
        options: CallOptions,
        mode: Mode,
    ) -> Result<(Call, Duration)> {
        let timeout = options
            .timeout
            .unwrap_or(self.inner.config.calls.timeout)
            .min(MAX_CALL_WINDOW);
        let args = to_cbor(args);
        if args.len() > MAX_CALL_ARGS_BYTES {
            return Err(Error::Invalid(ValidationError::new(
                "args",
                format!("{} bytes, at most {MAX_CALL_ARGS_BYTES}", args.len()),
            )));
        }
        let now = Timestamp::now();
        let call = Call {
            call_id: CallId(rand::random()),
            caller: self.inner.peer_id,
            target: peer,
            skill: SkillName::new(skill)?,
            version_req: options.version_req,
            args: ByteBuf::from(args),
            issued_at: now,
            expires_at: now.saturating_add(timeout),
            mode,
            grant: options.grant.map(ByteBuf::from),
        };
        Ok((call, timeout))
    }

    /// Calls a sync skill on `peer` with JSON arguments and returns its JSON output.
    pub async fn call(&self, peer: PeerId, skill: &str, args: Value) -> Result<Value> {
        self.call_with(peer, skill, args, CallOptions::default())
            .await
    }

    /// [`Node::call`] with options.
    pub async fn call_with(
        &self,
        peer: PeerId,
        skill: &str,
        args: Value,
        options: CallOptions,
    ) -> Result<Value> {
        let (call, timeout) = self.new_call(peer, skill, &args, options, Mode::Sync)?;
        let now = call.issued_at;
        // Signed by the pipe's writer, with the calls that queue beside it.
        let request = Request::Unsigned(envelope::prepare(&self.inner.signing, &call)?);
        let started = std::time::Instant::now();
        // Dropped before the answer (the application gave up on it): the callee stops too.
        let mut on_drop = CancelOnDrop {
            node: Some(self.clone()),
            peer,
            id: call.call_id,
        };
        let result = self.send_call(peer, request, call.call_id, timeout).await;
        on_drop.node = None;
        let error = match &result {
            Ok(r) => r.error.clone(),
            Err(Error::Timeout(_)) => Some(skillmesh_protocol::CallError::new(
                skillmesh_protocol::ErrorCode::Timeout,
                "no answer in time",
            )),
            Err(e) => Some(skillmesh_protocol::CallError::new(
                skillmesh_protocol::ErrorCode::Internal,
                e.to_string(),
            )),
        };
        self.inner.metrics.call(
            false,
            error.as_ref().map_or("ok", |e| e.code.name()),
            started.elapsed(),
        );
        let mut entry = CallLogEntry::new(
            call.call_id,
            Direction::Outbound,
            peer,
            call.skill.clone(),
            Mode::Sync,
            CallState::Submitted,
        );
        entry.started_at = now;
        entry.history[0].at = now;
        entry.error = error.as_ref().map(|e| e.code);
        entry.enter(final_state(error.as_ref()), Timestamp::now());
        self.inner.log.record(entry);
        let result = result?;
        match result.status {
            CallStatus::Completed => {
                let out = result.output.unwrap_or_default();
                from_cbor(&out, MAX_OUTPUT_BYTES).map_err(|e| Error::BadResponse {
                    peer: Box::new(peer),
                    reason: format!("output is not JSON-like CBOR: {e}"),
                })
            }
            CallStatus::Failed => Err(Error::Remote(result.error.unwrap_or_else(|| {
                skillmesh_protocol::CallError::new(
                    skillmesh_protocol::ErrorCode::Internal,
                    "no error given",
                )
            }))),
            CallStatus::Accepted => Err(Error::BadResponse {
                peer: Box::new(peer),
                reason: "accepted a sync call as async".to_owned(),
            }),
        }
    }

    /// Sends a call envelope signed elsewhere (by this node's key) and returns the callee's
    /// verified result, whatever its status.
    pub async fn call_raw(&self, peer: PeerId, envelope: Vec<u8>) -> Result<CallResult> {
        // Read the id as the callee will, signature unchecked: the answer to a call refused for
        // its signature still names it.
        let (call_id, _) = peek(&envelope);
        let request = Request::Signed(envelope);
        self.send_call(peer, request, call_id, self.inner.config.calls.timeout)
            .await
    }

    pub(crate) async fn send_call(
        &self,
        peer: PeerId,
        request: Request,
        call_id: CallId,
        timeout: Duration,
    ) -> Result<CallResult> {
        // A call to ourselves (a skill found by discovery may be our own) cannot be dialled; it
        // goes through the same signed pipeline and checks, without the network.
        let response = if peer == self.inner.peer_id {
            let request = request.signed(&self.inner.signing);
            let bytes = tokio::time::timeout(timeout, self.inner.inbound.handle(peer, request))
                .await
                .map_err(|_| Error::Timeout(timeout))?;
            envelope::open::<CallResult>(&bytes, &Checks::now().signed_by(peer)).map(|o| o.value)
        } else {
            tokio::time::timeout(timeout, self.inner.pipes.call(peer, request))
                .await
                .map_err(|_| Error::Timeout(timeout))??
        };
        read_result(response, peer, self.inner.peer_id, call_id)
    }

    /// Subscribes to an application topic (`name` of `a-z A-Z 0-9 . _ - /`) of this mesh.
    pub async fn subscribe(&self, name: &str) -> Result<Subscription> {
        let topic = self.inner.mesh.app_topic(name)?;
        let rx = self
            .request(|reply| Command::Subscribe { topic, reply })
            .await??;
        Ok(Subscription::new(name.to_owned(), rx))
    }

    /// Publishes `data` on an application topic. Fails with `Publish` when no peer subscribes
    /// to it yet (normal right after start: gossip meshes form within a heartbeat or two).
    pub async fn publish(&self, name: &str, data: impl Into<Vec<u8>>) -> Result<()> {
        let topic = self.inner.mesh.app_topic(name)?;
        let event = Event {
            topic: topic.clone(),
            publisher: self.inner.peer_id,
            seq: self.inner.event_seq.fetch_add(1, Ordering::Relaxed),
            issued_at: Timestamp::now(),
            data: ByteBuf::from(data.into()),
        };
        let bytes = envelope::seal(&self.inner.signing, &event)?;
        self.request(|reply| Command::Publish {
            topic,
            data: bytes,
            reply,
        })
        .await?
    }

    /// Connected peers that told us they subscribe to an application topic: those an event
    /// published now reaches directly. A peer tells its subscriptions a moment after it
    /// connects (`behaviour::SETTLE`, 10 ms), so one that connected just now may be missing.
    pub async fn subscribers(&self, name: &str) -> Result<Vec<PeerId>> {
        let topic = self.inner.mesh.app_topic(name)?;
        self.request(|reply| Command::Subscribers { topic, reply })
            .await
    }

    /// Publishes a JSON value.
    pub async fn publish_json(&self, name: &str, value: &Value) -> Result<()> {
        self.publish(name, serde_json::to_vec(value).unwrap_or_default())
            .await
    }

    /// Agents known to be online (announced on the presence topic recently) or connected now,
    /// with their skills.
    pub async fn peers(&self) -> Result<Vec<PeerInfo>> {
        self.request(|reply| Command::Peers { reply }).await
    }

    /// The newest `limit` calls this node made or served, newest first. Entries are written in
    /// the background, a moment after each call ends.
    pub async fn recent_calls(&self, limit: usize) -> Result<Vec<CallLogEntry>> {
        Ok(self.inner.store.recent_calls(limit).await?)
    }

    /// Every metric of this node in the Prometheus text format.
    pub fn metrics_text(&self) -> String {
        crate::metrics::render(&self.inner.registry_metrics)
    }

    /// Call log entries dropped because the disk fell behind.
    pub fn call_log_dropped(&self) -> u64 {
        self.inner.log.dropped()
    }

    /// Sends `data` end-to-end encrypted to `peer`: directly when it answers, else to the
    /// mailboxes its card names, where it waits (up to `mail.ttl`) until `peer` fetches it.
    pub async fn send(&self, peer: PeerId, data: &[u8]) -> Result<SendReport> {
        self.inner.messenger.send(peer, data).await
    }

    /// Received messages, in order per sender. Each message is handed out once, to whichever
    /// inbox takes it first, and is removed from the store when taken.
    pub fn inbox(&self) -> Inbox {
        Inbox::new(self.inner.messenger.clone())
    }

    /// The next received message if one is ready now (see [`Node::inbox`]).
    pub async fn try_next_message(&self) -> Result<Option<Message>> {
        self.inner.messenger.try_next_message().await
    }

    /// Fetches from this node's mailboxes now; returns how many new messages came.
    pub async fn fetch_mail(&self) -> usize {
        self.inner.messenger.fetch_round().await
    }

    /// `peer`'s agent card, from the DHT (or the store's cache when the DHT has none).
    pub async fn card(&self, peer: PeerId) -> Result<Option<skillmesh_protocol::AgentCard>> {
        self.inner.messenger.card_of(peer).await
    }

    /// Reachability, relay reservations, and whether each connection is direct or relayed.
    pub async fn nat_status(&self) -> Result<NatStatus> {
        self.request(|reply| Command::NatStatus { reply }).await
    }

    /// The mailboxes this node advertises.
    pub fn mailboxes(&self) -> Vec<PeerId> {
        self.inner.messenger.mailboxes()
    }

    /// Stops the node: calls in flight get up to 5 s to answer, then every connection closes and
    /// the call log is flushed. Once it returns and the last handle is dropped, the data dir can
    /// be opened again.
    pub async fn shutdown(&self) -> Result<()> {
        self.inner.inbound.stop();
        let fetcher = self
            .inner
            .fetcher
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(f) = fetcher {
            f.abort();
            let _ = f.await;
        }
        let _ = self.request(|reply| Command::Shutdown { reply }).await;
        let task = self
            .inner
            .task
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(task) = task {
            let _ = task.await;
        }
        // The event loop is gone, and with it every inbound call; flush the call log so that
        // nothing but this handle holds the store once shutdown returns.
        self.inner.log.close().await;
        Ok(())
    }
}

/// Cancels a sync call on its callee if the future waiting for it is dropped.
struct CancelOnDrop {
    node: Option<Node>,
    peer: PeerId,
    id: CallId,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(node) = self.node.take()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            let (peer, id) = (self.peer, self.id);
            rt.spawn(async move {
                if let Err(e) = node.send_cancel(peer, id).await {
                    tracing::debug!(%peer, call = %id, "cancel not delivered: {e}");
                }
            });
        }
    }
}

/// Keeps a call listed as under way (see [`Node::track_outbound`]).
pub(crate) struct OutboundGuard {
    node: Node,
    id: CallId,
}

impl Drop for OutboundGuard {
    fn drop(&mut self) {
        let mut map = self
            .node
            .inner
            .outbound
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        map.remove(&self.id);
    }
}

/// What this node's DHT lookups cost, counted since it started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct LookupStats {
    /// Provider lookups finished.
    pub lookups: u64,
    /// Requests they sent to other nodes.
    pub requests: u64,
    /// Requests that failed or timed out.
    pub failures: u64,
}

/// The last characters of a peer id: enough to tell nodes apart in logs (each node's log span
/// names it so).
pub fn short_id(peer: &PeerId) -> String {
    let s = peer.to_base58();
    s[s.len().saturating_sub(6)..].to_owned()
}
