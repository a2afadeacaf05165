package integration

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// tcpEstablished is the state code of an established connection in /proc/net/tcp.
const tcpEstablished = "01"

// establishedConnections lists the local addresses (in /proc's hex form) of
// the established TCP connections that process pid holds to remotePort. It
// reads /proc, so it sees the connections without the process's help.
func establishedConnections(pid, remotePort int) ([]string, error) {
	fdDir := fmt.Sprintf("/proc/%d/fd", pid)
	fds, err := os.ReadDir(fdDir)
	if err != nil {
		return nil, fmt.Errorf("list descriptors of process %d: %w", pid, err)
	}
	socketInodes := make(map[string]bool)
	for _, fd := range fds {
		link, err := os.Readlink(filepath.Join(fdDir, fd.Name()))
		if err != nil {
			continue // closed since ReadDir
		}
		if inode, ok := strings.CutPrefix(link, "socket:["); ok {
			socketInodes[strings.TrimSuffix(inode, "]")] = true
		}
	}

	var conns []string
	for _, table := range []string{"tcp", "tcp6"} {
		f, err := os.Open(fmt.Sprintf("/proc/%d/net/%s", pid, table))
		if err != nil {
			return nil, fmt.Errorf("read TCP table: %w", err)
		}
		scanner := bufio.NewScanner(f)
		scanner.Scan() // the header
		for scanner.Scan() {
			// sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode ...
			fields := strings.Fields(scanner.Text())
			if len(fields) < 10 || fields[3] != tcpEstablished || !socketInodes[fields[9]] {
				continue
			}
			_, portHex, _ := strings.Cut(fields[2], ":")
			if port, err := strconv.ParseUint(portHex, 16, 16); err == nil && int(port) == remotePort {
				conns = append(conns, fields[1])
			}
		}
		err = scanner.Err()
		f.Close()
		if err != nil {
			return nil, fmt.Errorf("read TCP table: %w", err)
		}
	}
	return conns, nil
}
