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
	var conns []string
	err := eachSocket(pid, []string{"tcp", "tcp6"}, func(_ string, fields []string) {
		if fields[3] != tcpEstablished {
			return
		}
		_, portHex, _ := strings.Cut(fields[2], ":")
		if port, err := strconv.ParseUint(portHex, 16, 16); err == nil && int(port) == remotePort {
			conns = append(conns, fields[1])
		}
	})
	return conns, err
}

// tcpListen is the state code of a listening socket in /proc/net/tcp.
const tcpListen = "0A"

// listeningSockets lists the sockets of process pid that wait for
// connections or datagrams: "tcp 0100007F:1F90" for a TCP listener on
// 127.0.0.1:8080 (/proc's hex form), "udp6 ..." for a bound UDP socket.
func listeningSockets(pid int) ([]string, error) {
	var socks []string
	err := eachSocket(pid, []string{"tcp", "tcp6", "udp", "udp6"}, func(table string, fields []string) {
		if strings.HasPrefix(table, "tcp") && fields[3] != tcpListen {
			return
		}
		socks = append(socks, table+" "+fields[1])
	})
	return socks, err
}

// eachSocket calls f with the fields of every line of pid's /proc/net
// tables that belongs to a socket the process holds:
// sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode ...
func eachSocket(pid int, tables []string, f func(table string, fields []string)) error {
	fdDir := fmt.Sprintf("/proc/%d/fd", pid)
	fds, err := os.ReadDir(fdDir)
	if err != nil {
		return fmt.Errorf("list descriptors of process %d: %w", pid, err)
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
	for _, table := range tables {
		file, err := os.Open(fmt.Sprintf("/proc/%d/net/%s", pid, table))
		if err != nil {
			return fmt.Errorf("read socket table: %w", err)
		}
		scanner := bufio.NewScanner(file)
		scanner.Scan() // the header
		for scanner.Scan() {
			fields := strings.Fields(scanner.Text())
			if len(fields) >= 10 && socketInodes[fields[9]] {
				f(table, fields)
			}
		}
		err = scanner.Err()
		file.Close()
		if err != nil {
			return fmt.Errorf("read socket table: %w", err)
		}
	}
	return nil
}
