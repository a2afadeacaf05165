// Package fakecluster is a test upstream that stands in for "kube-apiserver
// plus kubelet" as a client sees them, for tests of the streaming
// subresources (kubectl exec, attach, cp, port-forward and logs -f) where a
// real kube-apiserver runs but no kubelet does, so no pod ever runs.
//
// A Cluster is an HTTPS server on 127.0.0.1 with a certificate from a CA of
// its own (CAFile, CAPEM). It serves the pod subresources exec, attach,
// portforward and log itself, the way a real kube-apiserver 1.32 does:
//
//   - SPDY/3.1 upgrades of exec, attach and portforward go through the
//     apimachinery UpgradeAwareHandler to a fake kubelet (in the same process,
//     on a TLS listener of its own on 127.0.0.1), which answers with the
//     kubelet streaming library (k8s.io/kubelet/pkg/cri/streaming:
//     remotecommand.ServeExec, ServeAttach and portforward.ServePortForward).
//   - WebSocket upgrades with the v5.channel.k8s.io remote command protocol
//     (kubectl 1.30 and newer by default) go through the apiserver's
//     StreamTranslatorHandler, which speaks SPDY to the kubelet; WebSocket
//     upgrades with the port-forward tunneling protocol
//     (SPDY/3.1+portforward.k8s.io) go through its TunnelingHandler. Both come
//     from k8s.io/apiserver/pkg/util/proxy and are wired as in the apiserver's
//     pod registry (pkg/registry/core/pod/rest/subresources.go).
//   - log is answered directly: a few lines, or with follow=true a line every
//     Options.LogInterval until the client goes away.
//
// Before serving a subresource it asks the real kube-apiserver, with the
// client's own credentials (Authorization and Impersonate-* headers), whether
// the request is allowed (a SelfSubjectAccessReview for the verb the
// apiserver would check: get for GET, create for POST) and reads the pod (so
// the pod must exist, be bound to a node and have the container). Every other
// request is reverse-proxied to the real kube-apiserver unchanged.
//
// The kubelet runs a fake container runtime. Exec runs these commands
// in-process over the real streams:
//
//	cat                 copy stdin to stdout until stdin ends
//	cat FILE...         print files of the container's file system
//	echo ARG...         print the arguments
//	env                 print a fixed environment (HOSTNAME is the pod's name)
//	hostname            print the pod's name
//	stderr ARG...       print the arguments to stderr
//	exit N              exit with code N, which kubectl exits with
//	true, false         exit with 0, 1
//	sh -c 'SCRIPT'      SCRIPT is one of these commands, split at blanks
//	sleep SECONDS       sleep; like a real process it goes on when the
//	                    client goes away, but ends when the Cluster closes
//	tty-size            with a TTY: print "size COLSxROWS" at each resize
//	                    event (the first is the initial size) until stdin
//	                    ends or brings Ctrl-D
//	test -d|-f|-e PATH  test the container's file system
//	ls [PATH...]        list directories
//	mkdir [-p] DIR...   create directories
//	tar cf - PATH...    and tar [--no-same-permissions] [--no-same-owner]
//	                    -xmf - [-C DIR], what kubectl cp runs, on the
//	                    container's in-memory file system
//
// Any other command fails as a missing executable does with containerd: a
// message on stderr and exit code 126. Each container (by pod UID) has its
// own in-memory file system with /, /tmp, /root, /etc, /var and /home.
//
// Attach reaches a fake main process of the container: it greets with
// "attached to NAMESPACE/POD/CONTAINER", then echoes each line of stdin
// prefixed with "CONTAINER: " and ends with stdin (a TTY gets its bytes back
// as they are); without stdin it prints "CONTAINER: tick N" lines until the
// client goes away. Port-forward connects every port to a TCP echo server
// on 127.0.0.1 (EchoAddr), or where Options.PortTargets says.
//
// Streams and Requests tell a test what reached the upstream side, and how:
// whether kubectl used WebSocket or SPDY, whether a refused upgrade was
// retried, whether a stream ended there (LogStreamsEnded, WaitStreams).
//
// Pods never run, so CreateRunningPod creates a pod in the real apiserver and
// sets its status to Running with ready containers, which kubectl attach and
// port-forward insist on.
package fakecluster
